# Call 6 (H200, what 400 s of budget allow): the seed's best settings at micro-batches 32 and 40 (b40 fits only a
# >100 GB card), then whole generation at 4096 -> 512, every input 4096 tokens, at 512 rows (H100, session 41: 12.35
# against 12.05 at 256), tokens against transformers first.
. scripts/device/prelude.sh
F=group:fusedlora:loragemm:cache
step seed_batches 150 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "b32:$F,b40:$F" --warmup 6 --steps 14
step generate_512 170 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 512 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first
