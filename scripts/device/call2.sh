# Call 2 (any card, ~570 s): the warp-specialized training kernels, both off and never run on a GPU yet: the forward
# with dropout (flash_attention.WS_TRAINING_FORWARD, token wstrain) and the dK/dV backward (WS_BACKWARD, wsbwd; dS for
# the dQ GEMM); and LoRA's input dropout regenerated from a seed (lora_dropout.LORA_DROPOUT_KERNEL, loradrop, off).
# Their GPU tests (same seed: outputs and gradients equal the Triton path's; the backward's as close to float64; the
# LoRA kernels as close to float64 as native_dropout + cuBLAS), attention forward + backward with bias and dropout at
# the issue-15 yardstick's shape under each and both, one LoRA layer alone, then the seed's best step (micro-batch 16
# on 80 GB, 32 above) with and without them. Keep a lever only if its test passes and it is faster.
. scripts/device/prelude.sh
MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
B=b32; [ "${MB:-0}" -lt 100000 ] && B=b16
F=group:fusedlora:loragemm:cache
step ws_train_tests 170 python3 -m pytest -q $XDIST -m gpu tests/test_fast_t5_ws_forward.py tests/test_fast_t5_ws_backward.py \
  tests/test_fast_t5_lora_dropout.py -k "training or backward or lora" -p no:cacheprovider
step ws_train_kernels 130 python3 benchmarks/attention_kernels.py --no-flex --shapes 32x32x1024x128 \
  --kernels cudnn,triton+bias+dropout --patches wstrain,wsbwd,wstrain:wsbwd --tag wstrain
step lora_dropout 60 python3 benchmarks/lora_dropout.py
step ws_train_seed 180 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "$B:$F,$B:$F:wstrain:wsbwd,$B:$F:loradrop,$B:$F:wstrain:wsbwd:loradrop" --warmup 8 --steps 20
