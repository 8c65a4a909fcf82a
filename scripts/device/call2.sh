# Call 2 (any card, ~560 s): the rest of call 1's normweight A/B with room to finish (call 1 of session 42 gave the
# shipped step 130 s and generation 150 s, too little): the shipped training step, then whole generation with every
# input 4096 tokens at 256 rows, tokens against transformers first.
. scripts/device/prelude.sh
step shipped_norm 250 python3 benchmarks/train_throughput.py --config configs/t5-3b-billsum.yaml --reference "" \
  --fast "config,config:normweight" --warmup 8 --steps 20
step generate_norm 290 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches normweight
