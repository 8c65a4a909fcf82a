# Call 1 (an H200 for issue 14's figure; ~570 s): whole generation at 1024 rows (the figure: a full card's rows) with
# 512 new tokens under session 45's defaults (the 32-head warp-specialized decoding kernel unsplit, the ws encoder
# forward's lean far tiles), tokens against transformers first, then both off (nodecodews32:nowslean) as the same-run
# baseline. H100, session 45: 13.87 and 13.84 under the defaults (no baseline: both runs cut); by arithmetic the H100
# tops out near 14.7, the H200's 4.8 TB/s should carry the states-bound decode past 15.
. scripts/device/prelude.sh
step generate1024 560 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 1024 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches nodecodews32:nowslean
