# Call 1 (an H200 for issue 14's figure; any card, ~230 s): whole generation with every input 4096 tokens and 512
# new at 256 rows under session 45's defaults (the 32-head warp-specialized decoding kernel unsplit, the ws encoder
# forward's lean far tiles) against both off (nodecodews32:nowslean), tokens against transformers first. H100,
# session 45: 13.15 vs 12.55; H200, session 36: 13.04 (gluon_decode there was L2-bound, 93-95% busy).
. scripts/device/prelude.sh
step generate256 220 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches nodecodews32:nowslean
