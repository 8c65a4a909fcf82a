# Call 1 (an H200 only; ~500 s): issue 14's generation figure. Session 52's Nsight Compute run put the 32-head
# decoding kernel at 93.5% of an H100's DRAM at 1024 rows (91% at 256): bound there by the card's bandwidth, so the
# H200's 4.8 TB/s is the road left. First the kernel alone at 256 and 1024 rows x 4096 keys beside the 16-head kernel
# it replaced (nodecodews32, the same-run baseline; 2.71 ms at 1024 rows on an H200 under ncu in session 33), then
# whole generation at 1024 rows (every input 4096 tokens, 512 new, greedy), tokens against transformers first.
. scripts/device/prelude.sh
step kernel 70 python3 benchmarks/decode_attention.py --batches 256,1024 --repeats 10 --patches nodecodews32
step generate1024 "${STEP_S:-440}" python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 1024 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first
