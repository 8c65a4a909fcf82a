# Call 4 (any card, ~570 s; after calls 1-3): fast_t5.ws_forward's levers off until measured: WITHOUT_BIAS (token
# wsnobias; its cases are in every GPU test case), LEAN_FAR_TILES (wslean; session 42's call 5 cut every step) and
# head_dim 64 (ws64: T5-large, FLAN-T5-XL). Their GPU tests (compiles take ~80 s each), the op's no-gradient forward
# with T5's bias and padding under the default (ws_forward), nowsenc (the Triton forward), wslean and ws64, then whole
# generation with every input 4096 tokens at 256 rows under wslean, tokens against transformers first. Keep a lever
# only if faster and its test passes.
. scripts/device/prelude.sh
step ws_tests 280 python3 -m pytest -q $XDIST -m gpu tests/test_fast_t5_ws_forward.py -k "ring2 or lean or d64" -p no:cacheprovider
step ws_kernels 150 python3 benchmarks/attention_kernels.py --inference --no-flex --shapes 16x32x4096x128 \
  64x32x1024x128 16x32x4096x64 --kernels cudnn,triton+bias --patches nowsenc,wslean,ws64 --tag wslean
step ws_lean_generate 130 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches wslean
