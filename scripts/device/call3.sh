# Call 3 (any card, ~280 s; only if call 2's no-gradient rows gain): whole generation, every input 4096 -> 512, 256
# rows, the defaults against ONE_RELEASE with rings of three, tokens against transformers in every mode.
. scripts/device/prelude.sh
step generate256 270 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --patches wsonerelease:wsenc3
