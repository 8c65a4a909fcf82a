# Session 48, an H200 only (~230 s, what the budget had left): issue 14's generation figure at 256 rows
# (every input 4096 tokens, 512 new, greedy; tokens against transformers first). H100: 13.26 summaries/s at 256 rows.
. scripts/device/prelude.sh
step generate256 225 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first
