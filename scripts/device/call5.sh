# Call 5 (any card, ~330 s): fast_t5.ws_forward (on by default now) with LEAN_FAR_TILES (token wslean, off): its GPU
# test; the op's no-gradient forward at the encoder's shapes under nowsenc (the Triton forward) and wslean; whole
# generation with every input 4096 tokens at 256 rows under wslean, tokens against transformers first.
. scripts/device/prelude.sh
step ws_lean_test 80 python3 -m pytest -q -m gpu tests/test_fast_t5_ws_forward.py -k lean -p no:cacheprovider
step ws_lean_kernels 100 python3 benchmarks/attention_kernels.py --inference --no-flex --shapes 16x32x4096x128 \
  64x32x1024x128 --kernels cudnn,triton+bias --patches nowsenc,wslean --tag wslean
step ws_lean_generate 170 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches wslean
