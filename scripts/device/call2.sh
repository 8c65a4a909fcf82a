# Call 2 (any card, ~560 s): the warp-specialized forward for training (flash_attention.WS_TRAINING_FORWARD, token
# wstrain, off: dropout's paired draws made as the Triton backward remakes them; never run on a GPU yet). Its GPU test
# (same seed: output and gradients equal the Triton path's to rounding, another seed's not), attention forward +
# backward with bias and dropout at the issue-15 yardstick's shape and at 1024 x 64 rows under wstrain, then the seed's
# best step (micro-batch 16 on 80 GB, 32 above) with and without it. Keep it only if its test passes and it is faster.
. scripts/device/prelude.sh
MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
B=b32; [ "${MB:-0}" -lt 100000 ] && B=b16
F=group:fusedlora:loragemm:cache
step wstrain_test 150 python3 -m pytest -q -m gpu tests/test_fast_t5_ws_forward.py -k training -p no:cacheprovider
step wstrain_kernels 150 python3 benchmarks/attention_kernels.py --no-flex --shapes 32x32x1024x128 \
  --kernels cudnn,triton+bias+dropout --patches wstrain --tag wstrain
step wstrain_seed 200 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "$B:$F,$B:$F:wstrain" --warmup 8 --steps 20
