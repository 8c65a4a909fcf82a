# Session 48, an H100 (~170 s): FLAN-T5-XL generation at 128 rows under "auto" (the default): kv's caches (96 GiB) do
# not fit, so auto now takes "hidden" (t5_decode.KV_CACHE_SHARE_OF_FREE); before, the batch ran out of memory.
. scripts/device/prelude.sh
step flan_auto128 200 python3 benchmarks/generate_throughput.py --model flan-t5-xl --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 128 --timed-batches 1 \
  --reference-batches "" --agreement-inputs 0
