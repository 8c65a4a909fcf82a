# Call 1: where the seed's best step and the shipped config's step go now (issue 15's two open points): each timed,
# then 2 steps under torch.profiler; `--profile` saves kernel ms a step by family and the top kernels in each row.
# The seed at micro-batch 32 needs ~98 GiB: an 80 GB card gets b16.
. scripts/device/prelude.sh
MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
B=b32; [ "${MB:-0}" -lt 100000 ] && B=b16
step seed_profile 300 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "$B:group:fusedlora:loragemm:cache" --warmup 8 --steps 20 --profile
step shipped_profile 220 python3 benchmarks/train_throughput.py --config configs/t5-3b-billsum.yaml --reference "" \
  --fast config --warmup 8 --steps 20 --profile
