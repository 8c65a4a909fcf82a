# Call 2 (after call 1, same card, ~540 s): the same A/B at 1024 rows (H100, session 45: 13.87 and 13.84 under the
# defaults in two runs, both cut before the baseline row: give it the whole call), no agreement check (call 1 did it).
. scripts/device/prelude.sh
step generate1024 530 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 1024 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 0 --patches nodecodews32:nowslean
