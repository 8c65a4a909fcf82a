# Call 8 (an H200 only, ~180 s: what a budget of ~300 s leaves after a start): a first test of session 52's
# arithmetic (NOTES: the 32-head decoding kernel at 2.2-2.45 ms at 1024 rows on an H200 against 2.84 on an H100).
# The kernel alone beside the 16-head kernel (nodecodews32, the same-run baseline), then whole generation at 256 rows
# (every input 4096 tokens, 512 new, greedy) without the tokens check (call5.sh has it: H100 13.15-13.29 at 256 rows).
. scripts/device/prelude.sh
step kernel 60 python3 benchmarks/decode_attention.py --batches 256,1024 --repeats 10 --patches nodecodews32
step generate256 "${STEP_S:-120}" python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 0
