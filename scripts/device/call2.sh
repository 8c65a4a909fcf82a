# Call 2 (any card, ~330 s): issue 15's seed on whatever card comes, profiled, under today's defaults (session 47's
# H100 b24 figure: 48.1 samples/s, kernel time 483 of a 499 ms step), b24 and b32 with the stock reference at 16.
. scripts/device/prelude.sh
F=group:fusedlora:loragemm:cache
step seed_any 320 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "16" \
  --fast "b24:$F,b32:$F" --warmup 8 --steps 20
