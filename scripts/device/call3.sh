# Call 3 (any card, ~560 s; only if call 2's overlapenc row gains): issue 14's figure with the encoder overlapped, at
# 1024 rows in 4 batches of 256 (the overlap needs more than one batch), tokens against transformers first; the
# defaults as the same-run baseline.
. scripts/device/prelude.sh
step generate4x256 555 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 4 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches overlapenc
