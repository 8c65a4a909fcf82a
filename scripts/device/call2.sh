# Call 2: where whole generation at 4096 -> 512 goes (issue 14's open point, 15 summaries/s): the encoder of 256
# inputs of 4096 tokens and the fused decode loop timed, and a few eager decode steps' kernels by family.
. scripts/device/prelude.sh
step generate_profile 420 python3 benchmarks/generate_profile.py --model t5-3b --batches 256 --source-tokens 4096 \
  --new-tokens 512 --full-length --attention fused --encoder-chunks 16 --no-stock-encoder --tag s41
