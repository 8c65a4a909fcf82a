# Call 5 (any card): where generation's time goes at 4096 -> 512, every input 4096 tokens, at 256 and 1024 rows:
# the encoder's kernels by family (attention against the GEMMs, saved as encoder_fast_kernels) and a decode step's.
. scripts/device/prelude.sh
step generate_profile 500 python3 benchmarks/generate_profile.py --batches 256,1024 --source-tokens 4096 \
  --new-tokens 512 --full-length --attention fused --encoder-chunks 16 --no-stock-encoder --tag s41-encoder
