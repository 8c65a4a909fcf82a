# Call 7 (session 51, any card, ~540 s): the next batch's encoder beside this batch's decoding, with the 32-head
# decoding kernel's unsplit launches as fewer persistent programs than SMs (gluon_decode_ws.PROGRAMS) so that the
# encoder's kernels get the other SMs while that bandwidth-bound kernel runs (sessions 39 and 49 overlapped without
# this: no gain, the kernel's one-a-row programs took every SM). GPU tests first (persistent = one a row, bit for bit;
# the overlap's tokens), then the kernel alone at 256 and 1024 rows under 132/100/88/66 programs (does the kernel keep
# its bandwidth on fewer SMs?), then whole generation at 3 timed batches of 256 rows x 4096 -> 512 (two of them with
# their encoder overlapped), the default row first (the same-run baseline).
. scripts/device/prelude.sh
step tests 120 python3 -m pytest -q -m gpu $XDIST tests/test_gluon_decode_ws.py tests/test_generation_decoding.py \
  -k "persistent or second_stream or warp_specialized_decode_kernel_matches"
step kernel 110 python3 benchmarks/decode_attention.py --batches 256,1024 --repeats 10 \
  --patches wsprograms132,wsprograms100,wsprograms88,wsprograms66
step generate 300 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 --new-tokens 512 \
  --full-length --greedy-only --fast-batches 256 --timed-batches 3 --reference-batches "" --agreement-inputs 0 \
  --patches overlapenc:wsprograms88,overlapenc:wsprograms66
