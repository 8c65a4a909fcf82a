# Call 3 (a short one, ~260 s: what a nearly spent budget allows). On an H200: issue 14's figure alone, generation at
# 1024 rows under the defaults, tokens against transformers first (no same-run baseline: it does not fit; H100
# baselines are in session 45-47's files). On an H100: the seed's step at micro-batch 24 under today's defaults,
# profiled (kernel time by family), to plan issue 15's next lever.
. scripts/device/prelude.sh
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  step generate1024 255 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
    --new-tokens 512 --full-length --greedy-only --fast-batches 1024 --timed-batches 1 --reference-batches "" \
    --agreement-inputs 2 --agreement-first
else
  step seed_profile 240 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
    --fast "b24:group:fusedlora:loragemm:cache" --warmup 6 --steps 16 --profile
fi
