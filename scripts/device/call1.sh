# Call 1 (an H200 for issue 14's figure; any card, ~420 s): whole generation at 256 rows with 512 new tokens under
# session 45's defaults (the 32-head warp-specialized decoding kernel unsplit, the ws encoder forward's lean far tiles)
# against both off (nodecodews32:nowslean): every input 4096 tokens, tokens against transformers first (H100, session
# 45: 13.15 vs 12.55; H200, session 36: 13.04, gluon_decode L2-bound there), then real bills cut at 4096, warm on
# every timed input (rows of uneven lengths: one program a row and SM may balance worse than gluon_decode's two;
# H200, session 34: 19.94).
. scripts/device/prelude.sh
step generate256 220 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches nodecodews32:nowslean
step generate_bills 180 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --greedy-only --fast-batches 256 --timed-batches 2 --warm-all --reference-batches "" \
  --agreement-inputs 0 --patches nodecodews32
