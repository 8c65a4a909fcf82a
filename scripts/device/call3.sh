# Call 3 (any card, ~520 s): head_dim 64 in the warp-specialized encoder forward (ws_forward.HEAD_DIMS, token ws64:
# 5.45 vs 6.46 ms at 16x32x4096x64 on an H100 in session 46; its GPU case d64 passed, but without the lean far tiles
# the default uses: d64lean is that case) and calls without a bias (WITHOUT_BIAS, token wsnobias: attention_kernels.py
# now times the bare no-bias row under each patch), then FLAN-T5-XL generation (head_dim 64) under ws64, tokens
# against transformers first. Six files come back (three logs, pip.log, gpu.txt, results).
. scripts/device/prelude.sh
step ws64_test 150 python3 -m pytest -q $XDIST -m gpu tests/test_fast_t5_ws_forward.py -k "d64lean or ring2" \
  -p no:cacheprovider
step ws64_kernels 130 python3 benchmarks/attention_kernels.py --inference --no-flex --shapes 16x32x4096x64 \
  16x32x4096x128 --kernels cudnn,triton+bias,triton --patches ws64,wsnobias --tag ws64b
step ws64_generate 230 python3 benchmarks/generate_throughput.py --model flan-t5-xl --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 128 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches ws64
