# Call 3 (H200, 141 GB; ~560 s): the issues' figures on their card with session 42's defaults (normweight, the
# warp-specialized encoder forward): the seed's best settings at micro-batches 32 and 40 (b40 fits only a >100 GB card),
# then whole generation at 4096 -> 512 with every input 4096 tokens at batches 256 and 1024, tokens against
# transformers first (H100, session 42: 12.55 at 256 rows).
. scripts/device/prelude.sh
F=group:fusedlora:loragemm:cache
step seed_batches 200 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "b32:$F,b40:$F" --warmup 8 --steps 20
step generate_batches 340 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256,1024 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first
