# Call 0 (session 39): the new flags' GPU tests, their kernel-level A/B at the seed's attention shape, then the seed's
# best settings with and without all four (no profile: two rows fit one call).
. scripts/device/prelude.sh
step gpu_tests_new_flags 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_t5_attention.py \
  -k "gpu_ds_from_dropped or gpu_fwd_cvt or gpu_lean_backward"
step attention_new_flags 200 python3 benchmarks/attention_kernels.py --shapes 32x32x1024x128 --no-flex \
  --kernels cudnn,triton+bias+dropout --patches bwdlean,dsfma,pcvt,bwdlean:dsfma:pcvt,bwdlean:dsfma:pcvt:widemulall \
  --repeats 20 --tag new-flags-train
step seed_new_flags 260 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "b32:group:fusedlora:loragemm:cache,b32:group:fusedlora:loragemm:cache:bwdlean:dsfma:pcvt:widemulall" \
  --warmup 8 --steps 30
