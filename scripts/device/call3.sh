# Call 3 (any card, ~480 s): LoRA dropout from a seed (on since session 45). Its backward with the keep flags through
# a scratch tile (lora_dropout.MASK_SCRATCH, token ldscratch, off; built: 651 vs 857 loop instructions, Philox once,
# no cp.async): GPU test, one layer, then the seed's best settings at the micro-batch it frees memory for (b48 above
# 100 GB, b24 on 80 GB) against the best without it (noloradrop), with and without ldscratch; then the GPU test of
# gluon_decode, pinned to the 16-head kernel in session 45 (not run on a GPU since that edit). Eight files come back
# (four logs, two results, pip.log, gpu.txt): the device's limit.
. scripts/device/prelude.sh
MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
B=b16; UP=b24; [ "${MB:-0}" -gt 100000 ] && B=b32 && UP=b48
F=group:fusedlora:loragemm:cache
step lora_scratch_test 100 python3 -m pytest -q $XDIST -m gpu tests/test_fast_t5_lora_dropout.py \
  tests/test_generation.py -k "gpu_kernels or gluon_decode_kernel" -p no:cacheprovider
step lora_scratch_layer 60 python3 benchmarks/lora_dropout.py --tiles 64x64x8x3 --patches ldscratch
step seed_loradrop 300 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "$B:$F:noloradrop,$B:$F,$UP:$F,$UP:$F:ldscratch" --warmup 8 --steps 20
