# Session 48, any card (~330 s): the ws forward's new levers (MASK_AHEAD, DEFER_PV_WAIT): GPU tests, then kernel rows.
. scripts/device/prelude.sh
step ws_tests 200 python3 -m pytest -m gpu tests/test_fast_t5_ws_forward.py $XDIST -q -x
step ws_train_kernels 110 python3 benchmarks/attention_kernels.py --no-flex --shapes 32x32x1024x128 4x32x4096x128 \
  --kernels cudnn,triton+bias+dropout --patches wstrain,wstrain:wsahead,wstrain:wsdefer,wstrain:wsahead:wsdefer \
  --tag wsahead
step ws_nograd_kernels 90 python3 benchmarks/attention_kernels.py --inference --no-flex \
  --shapes 16x32x4096x128 64x32x1024x128 --kernels cudnn,triton+bias --patches wsdefer --tag wsdefer
