# Session 48, an H100 (~300 s): FLAN-T5-XL generation, kv against hidden at 64, 128, 256 rows (kv's caches ran out of
# memory at 128 rows in session 47; hidden held 16 GiB at 64): which mode "auto" should take for large batches.
. scripts/device/prelude.sh
step flan_hidden 290 python3 benchmarks/generate_throughput.py --model flan-t5-xl --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 64,128,256 --hidden --timed-batches 1 \
  --reference-batches "" --agreement-inputs 0
