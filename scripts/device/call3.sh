# Call 3 (any card, ~330 s): the seed's best settings with LoRA dropout from a seed (on since session 45) at the
# micro-batch it frees memory for (b48 above 100 GB, b24 on 80 GB) against the best without (noloradrop) and with it
# at the same micro-batch; then the GPU test of gluon_decode, which session 45 pinned to the 16-head kernel now that
# the 32-head one takes d_model-1024 cross-attention by default (not run on a GPU since that edit).
. scripts/device/prelude.sh
MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
B=b16; UP=b24; [ "${MB:-0}" -gt 100000 ] && B=b32 && UP=b48
F=group:fusedlora:loragemm:cache
step seed_loradrop 250 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "$B:$F:noloradrop,$B:$F,$UP:$F" --warmup 8 --steps 20
step gluon_decode_test 70 python3 -m pytest -q $XDIST -m gpu tests/test_generation.py -k "gluon" -p no:cacheprovider
