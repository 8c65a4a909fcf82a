# Call 2 (any card, ~400 s): the warp-specialized decoding kernel (cross_attention.GLUON_WARP_SPECIALIZED, token
# decodews32, off) where session 44 (H100) found it faster alone: 1024 rows x 4096 keys, 2.90 vs 3.17 ms (slower at
# 256 rows: 0.98 vs 0.82; generation at 256 rows 11.6 vs 12.4). The kernel alone at 512 rows, then whole generation
# at 1024 rows with every input 4096 tokens with and without it (session 41, H100: 12.49 summaries/s shipped),
# tokens against transformers first. Keep it (for launches of that many rows) only if generation is faster.
. scripts/device/prelude.sh
step decodews_kernel512 60 python3 benchmarks/decode_attention.py --batches 512 --keys 4096 --patches decodews32
step decodews_generate1024 330 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 1024 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches decodews32
