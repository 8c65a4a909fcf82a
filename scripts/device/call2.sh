# Call 2 (after call 1, same card, ~470 s; eight files come back: the limit): 256 rows under the defaults against
# both off, no agreement (call 1 did it), then real bills cut at 4096, warm on every timed input (rows of uneven
# lengths: one program a row and SM may balance worse than gluon_decode's two; H200, session 34: 19.94).
. scripts/device/prelude.sh
step generate256 220 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 0 --patches nodecodews32:nowslean
step generate_bills 180 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --greedy-only --fast-batches 256 --timed-batches 2 --warm-all --reference-batches "" \
  --agreement-inputs 0 --patches nodecodews32
# The decoding kernel alone, now timed in CUDA graphs (decode_attention.py --timing graph, the default since session
# 46): session 46's eager figures at 32-64 rows carried the host's launch path (64 rows under the 32-head kernel read
# 0.61 ms, 32 rows 1.03); does the split combine kernel still win there without it?
step decode_graphs 60 python3 benchmarks/decode_attention.py --batches 32,64,256 --keys 4096 \
  --patches nofusedcombine,nodecodews32,nodecodews32:nofusedcombine
