# Call 1 (any card, ~540 s): fast_t5.ws_forward's LEAN_FAR_TILES (token wslean, off until measured; session 42's call 5
# cut every step): its GPU test (compiles take ~80 s), the op's no-gradient forward with T5's bias and padding at the
# encoder's shapes under the default (ws_forward), nowsenc (the Triton forward) and wslean, then whole generation with
# every input 4096 tokens at 256 rows under wslean, tokens against transformers first. Keep wslean only if faster and
# its test passes.
. scripts/device/prelude.sh
step ws_lean_test 170 python3 -m pytest -q -m gpu tests/test_fast_t5_ws_forward.py -k lean -p no:cacheprovider
step ws_lean_kernels 150 python3 benchmarks/attention_kernels.py --inference --no-flex --shapes 16x32x4096x128 \
  64x32x1024x128 --kernels cudnn,triton+bias --patches nowsenc,wslean --tag wslean
step ws_lean_generate 200 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches wslean
