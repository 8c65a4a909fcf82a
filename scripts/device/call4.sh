# Call 4 (any card, ~200 s): the key splits combined in one Triton kernel (cross_attention.FUSED_COMBINE, token
# fusedcombine, off; tested on CPU only). Launches split over keys where rows are few (real bills at 64 rows; the
# 32-head kernel below 132 rows). The decoding step's cross-attention alone at 32 and 64 rows x 4096 keys, both
# kernels with and without it, then whole generation on real bills cut at 4096 at batch 64, warm on every timed input.
. scripts/device/prelude.sh
step combine_kernel 60 python3 benchmarks/decode_attention.py --batches 32,64 --keys 4096 --tiles 64x8x16x2 \
  --patches fusedcombine,nodecodews32,nodecodews32:fusedcombine
step combine_generate 140 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --greedy-only --fast-batches 64 --timed-batches 2 --warm-all --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches fusedcombine
