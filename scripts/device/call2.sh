# Call 2 (any card, ~330 s): the warp-specialized decoding kernel (cross_attention.GLUON_WARP_SPECIALIZED, token
# decodews32, off) now unsplit at 256 rows (WS_MIN_PROGRAMS 132: one program an SM). Session 44 (H100) ran it in two
# key splits there plus their combine: 0.98 vs 0.82 ms, generation 11.6 vs 12.4 summaries/s; unsplit at 1024 rows it
# was faster (2.90 vs 3.17). The kernel alone at 256 and 1024 rows (wsmin264: the old splits, same run), then whole
# generation at 256 rows with every input 4096 tokens, tokens against transformers first. Keep it if generation is
# faster. Five files come back: two logs and a result file a step is six with pip.log and gpu.txt.
. scripts/device/prelude.sh
step decodews_kernel 70 python3 benchmarks/decode_attention.py --batches 256,1024 --keys 4096 \
  --tiles 64x8x16x2 --patches decodews32,decodews32:wsmin264
step decodews_generate 260 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches decodews32,wslean,decodews32:wslean
