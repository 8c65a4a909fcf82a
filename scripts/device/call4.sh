# Call 4 (an H200 for issue 15's figures, ~540 s): the seed's best settings under session 46's defaults (LoRA dropout
# from a seed with its scratch-tile backward) at b48 (the memory it frees), and the shipped config as shipped, with
# the stock reference in the same run (H200, session 36: seed 49.8), each seed row with --profile: the kernel time a
# step by family, which the seed has not had saved yet (where the 60 samples/s of issue 15 would have to come from).
. scripts/device/prelude.sh
F=group:fusedlora:loragemm:cache
step seed_h200 390 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "16" \
  --fast "b48:$F,b48:$F:noldscratch" --warmup 8 --steps 20 --profile
step shipped_h200 140 python3 benchmarks/train_throughput.py --config configs/t5-3b-billsum.yaml --reference "" \
  --fast "config" --warmup 8 --steps 20
