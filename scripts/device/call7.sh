# Call 7 (~350 s): the 32-head Gluon decoding kernel (cross_attention.GLUON_WIDE, token decodewide): its GPU test
# against float64, the kernel alone beside the shipped 16-head one at 256 and 1024 rows x 4096 keys, then whole
# generation with every input 4096 tokens at 256 rows, shipped and decodewide, tokens checked.
. scripts/device/prelude.sh
step gpu_wide_test 80 python3 -m pytest -q -m gpu tests/test_generation.py -k "wide" -p no:cacheprovider
step decode_kernel 90 python3 benchmarks/decode_attention.py --batches 256,1024 --patches decodewide --repeats 20
step generate_wide 200 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches decodewide
