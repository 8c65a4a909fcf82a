# Call 6 (an H200 only, ~300 s: what a budget of ~500 s leaves after a start): issue 14's generation figure at 1024 rows
# (every input 4096 tokens, 512 new, greedy), tokens against transformers first, the defaults alone (call1.sh adds the
# session-45 baseline when the budget allows).
. scripts/device/prelude.sh
step generate1024 "${STEP_S:-420}" python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 1024 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first
