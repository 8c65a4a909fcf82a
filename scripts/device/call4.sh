# Call 4 (H200 for issue 14's figure, ~380 s): whole generation with every input 4096 tokens and 512 new, under
# session 45's new defaults (decodews32 unsplit and wslean on) against both off (nodecodews32:nowslean), at 256 and
# 1024 rows, tokens against transformers first (H100, call 2: 13.11 vs 12.48 at 256 rows; H200 session 36: 13.04).
. scripts/device/prelude.sh
step generate_defaults 370 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256,1024 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches nodecodews32:nowslean
