# Call 1 (any card, ~500 s): T5LayerNorm's weight inside torch's fused RMSNorm kernel (modules.RMS_NORM_WEIGHT_IN_KERNEL,
# token normweight, off until measured) A/B in the same runs: the shipped training step, the seed's best, and whole
# generation with every input 4096 tokens at 256 rows (tokens against transformers first); then the GPU numerics
# test with and without it. The seed at b32 needs ~98 GiB: an 80 GB card gets b16.
. scripts/device/prelude.sh
MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
B=b32; [ "${MB:-0}" -lt 100000 ] && B=b16
F=group:fusedlora:loragemm:cache
step shipped_norm 130 python3 benchmarks/train_throughput.py --config configs/t5-3b-billsum.yaml --reference "" \
  --fast "config,config:normweight" --warmup 8 --steps 20
step seed_norm 130 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "$B:$F,$B:$F:normweight" --warmup 8 --steps 20
step generate_norm 150 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches normweight
step gpu_numerics_norm 90 python3 -m pytest -q -m gpu tests/test_fast_t5.py -k "t5_3b_widths" -p no:cacheprovider
