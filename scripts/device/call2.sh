# Call 2 (any card, ~300 s): FLAN-T5-XL generation in the hidden mode against kv ('auto' there: n_heads x d_kv equals
# d_model, so both read the same bytes a step, but kv caches each of 24 layers' keys and values, 66 GiB at 64 rows x
# 4096, and ran out of memory at 128 rows in session 47; hidden caches the encoder's states once). If hidden is as
# fast or faster, 'auto' should pick it for long sources (larger batches fit). No token check: random FLAN-T5-XL
# weights diverge under bf16 noise (transformers against itself: 10.6% of tokens equal, session 47).
. scripts/device/prelude.sh
step flan_modes 290 python3 benchmarks/generate_throughput.py --model flan-t5-xl --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 32,64 --hidden --timed-batches 1 \
  --reference-batches "" --agreement-inputs 0
