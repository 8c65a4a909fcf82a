# Call 3: numerics at T5-3b widths under the defaults (fast vs float32 at least as close as stock), the generation GPU
# tests, then the attention rows at 4096 with and without the lean dK/dV loops.
. scripts/device/prelude.sh
step gpu_numerics_tests 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_t5.py tests/test_generation.py
step attention_4096_leanbwd 200 python3 benchmarks/attention_kernels.py --shapes 4x32x4096x128 --no-flex \
  --kernels cudnn,triton+bias+dropout --patches nobwdlean --repeats 10 --tag leanbwd-4096
