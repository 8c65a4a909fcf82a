# Call 1: the attention GPU tests under the new default (LEAN_BACKWARD on: its float64 test among them), then the
# seed's best at micro-batch 32 (an H200: it needs ~98 GiB) with and without the lean dK/dV loops, 30 timed steps.
# On an H100 use b16 (b32 ran out of memory there on 2026-12-05).
. scripts/device/prelude.sh
step gpu_attention_tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_t5_attention.py
# b32 needs ~98 GiB: an 80 GB card gets b16.
MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
B=b32; [ "${MB:-0}" -lt 100000 ] && B=b16
step seed_leanbwd 330 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "$B:group:fusedlora:loragemm:cache,$B:group:fusedlora:loragemm:cache:nobwdlean" --warmup 8 --steps 30
