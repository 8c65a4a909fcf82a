# Call 1 (any card, ~570 s): a row's 32 heads in one warp-specialized decoding program (generation.gluon_decode_ws,
# cross_attention.GLUON_WARP_SPECIALIZED, token decodews32, off; never run on a GPU yet): its GPU test against float64,
# the decode kernel alone at 256 and 1024 rows x 4096 keys against the shipped Gluon kernel, then whole generation with
# every input 4096 tokens at 256 rows under decodews32 and decodews32:wslean, tokens against transformers first.
# Keep a lever only if its test passes, it is faster and the tokens stay equal.
. scripts/device/prelude.sh
step decodews_test 120 python3 -m pytest -q $XDIST -m gpu tests/test_gluon_decode_ws.py -p no:cacheprovider
step decodews_kernel 90 python3 benchmarks/decode_attention.py --batches 256,1024 --keys 4096 --patches decodews32
step decodews_generate 300 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches decodews32,decodews32:wslean
