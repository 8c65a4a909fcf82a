# Call 2 (H200, 141 GB; ~450 s): the seed's best settings at micro-batches 32 and 40 (b40 fits only a >100 GB card), then
# whole generation at 4096 -> 512 with every input 4096 tokens at batches 256 and 1024 (H100, session 41: 12.05 and
# 12.49 summaries/s), tokens against transformers first.
. scripts/device/prelude.sh
F=group:fusedlora:loragemm:cache
step seed_batches 200 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "b32:$F,b40:$F" --warmup 8 --steps 20
step generate_batches 400 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256,1024 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first
