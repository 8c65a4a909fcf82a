# Call 2 (any card, ~480 s; at most eight files come back): session 47's changes on a GPU.
# 1. GPU tests: the decoding kernel at FLAN-T5-XL's d_model 2048 (its 64-key tile does not fit an H100's shared
#    memory: halved until one does) and the 32-head kernel with split launches (WS_SPLIT_LAUNCHES on in its test).
# 2. FLAN-T5-XL generation (head_dim 64: ws64 on by default since session 47), tokens against transformers first (the
#    fused mode included, which crashed in session 47 before the tile fix), nows64 as the same-run baseline.
# 3. Real bills at batch 64: defaults (split launches in gluon_decode) against wssplit (the 32-head kernel split).
. scripts/device/prelude.sh
step gpu_tests 150 python3 -m pytest -q $XDIST -m gpu tests/test_generation_cross_attention.py \
  tests/test_gluon_decode_ws.py -p no:cacheprovider
step flan_generate 220 python3 benchmarks/generate_throughput.py --model flan-t5-xl --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 128 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches nows64
step bills64 110 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --greedy-only --fast-batches 64 --timed-batches 2 --warm-all --reference-batches "" \
  --agreement-inputs 0 --patches wssplit
