# Call 5 (any card, ~560 s; after calls 1-4): fast_t5.ws_forward's levers still off: WITHOUT_BIAS (token wsnobias;
# its cases are in every GPU test case) and head_dim 64 (ws64: T5-large, FLAN-T5-XL). Their GPU tests (compiles take
# ~80 s each), the op's no-gradient forward with T5's bias and padding under the default (ws_forward with the lean far
# tiles, on since session 45), nowsenc (the Triton forward), nowslean and ws64. Keep a lever only if faster and its
# test passes.
. scripts/device/prelude.sh
step ws_tests 280 python3 -m pytest -q $XDIST -m gpu tests/test_fast_t5_ws_forward.py -k "d64" -p no:cacheprovider
step ws_kernels 150 python3 benchmarks/attention_kernels.py --inference --no-flex --shapes 16x32x4096x128 \
  64x32x1024x128 16x32x4096x64 --kernels cudnn,triton+bias --patches nowsenc,nowslean,ws64,wsnobias --tag ws64
