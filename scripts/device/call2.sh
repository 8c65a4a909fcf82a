# Call 2 (any card, ~400 s): generation.decoding.OVERLAP_ENCODER (session 49, CPU only so far): the next batch's encoder
# chunks on a second CUDA stream between the current batch's decoding steps (encoder matmul-bound, decoding
# bandwidth-bound: ~29 and ~43 ms a summary one after the other on an H100 at 4096 -> 512). GPU test (tokens equal
# with and without), then whole generation at 4 batches of 256 rows, every input 4096 -> 512, defaults against
# overlapenc in the same run (tokens_equal_first_row in each row).
. scripts/device/prelude.sh
step overlap_test 100 python3 -m pytest -m gpu tests/test_generation_decoding.py -q -x -k second_stream
step overlap256 400 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 4 --reference-batches "" \
  --agreement-inputs 0 --patches overlapenc
