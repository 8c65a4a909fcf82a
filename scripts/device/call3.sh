# Call 3: whole generation at 4096 -> 512 with every input 4096 tokens at batch 256 (the figure on file) and at the
# larger batches the Gluon decode kernel has not been timed at in whole generation (its kernel alone: 3.28 ms at 1024
# rows against 4 x 0.92 at 256), one timed batch each after a warm-up batch; tokens against transformers first.
# Rows print as they finish (the log keeps them if the step's limit cuts the run before the file is saved).
. scripts/device/prelude.sh
step generate_batches 540 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256,1024,512 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first
