# Call 8 (session 51, after call7 if the overlap gains; ~520 s): issue 14's figure with the encoder overlapped, every
# input 4096 tokens, 512 new, greedy, 3 timed batches of ROWS (default 512) rows (two with their encoder beside the
# batch before's decoding); tokens against transformers first under the patch, the default row as the same-run
# baseline. PATCH: the winning setting of call7 (default overlapenc:wsprograms88).
. scripts/device/prelude.sh
step generate_overlap 510 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches "${ROWS:-512}" --timed-batches 3 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches "${PATCH:-overlapenc:wsprograms88}"
