# Call 9 (session 51, any card, ~330 s: call7 cut for a budget under ~650 s): the persistent decoding programs' GPU
# tests, the kernel alone at 1024 rows under 88 and 66 programs, whole generation at 3 timed batches of 256 rows x 4096
# -> 512 with and without the encoder overlapped beside 88 programs.
. scripts/device/prelude.sh
step tests 70 python3 -m pytest -q -m gpu $XDIST tests/test_gluon_decode_ws.py tests/test_generation_decoding.py \
  -k "persistent or second_stream"
step kernel 60 python3 benchmarks/decode_attention.py --batches 1024 --repeats 10 --patches wsprograms88,wsprograms66
step generate 200 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 --new-tokens 512 \
  --full-length --greedy-only --fast-batches 256 --timed-batches 3 --reference-batches "" --agreement-inputs 0 \
  --patches overlapenc:wsprograms88
