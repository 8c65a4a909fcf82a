# Call 1 (any card, ~450 s): what LoRA dropout from a seed (lora_dropout.LORA_DROPOUT_KERNEL, token loradrop, off)
# buys with its memory. Session 44 (H100): the seed's step at b16 47.13 vs 47.09 samples/s, 45.9 vs 53.1 GiB; since
# then only layers whose input is at least as wide as the output take it (o, wo). The seed at the next micro-batch up
# with it (b24 on 80 GB, b48 above) against the best without (b16 / b32), then the shipped config with the reference's
# LoRA dropout 0.05 back (it ships none: PEFT's copy costs ~20 GiB) without and with it, against the shipped config.
# Six files come back (the device returns at most 8): two logs and one result file a step, pip.log, gpu.txt.
. scripts/device/prelude.sh
MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
B=b16; UP=b24; [ "${MB:-0}" -gt 100000 ] && B=b32 && UP=b48
F=group:fusedlora:loragemm:cache
step loradrop_seed 200 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "$B:$F,$B:$F:loradrop,$UP:$F:loradrop" --warmup 8 --steps 20
step loradrop_shipped 230 python3 benchmarks/train_throughput.py --config configs/t5-3b-billsum.yaml --reference "" \
  --fast "config,config:ldrop5,config:ldrop5:loradrop" --warmup 8 --steps 20
