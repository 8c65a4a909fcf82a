# Call 2 (any card, ~330 s): ws_forward.ONE_RELEASE (session 48, CPU only so far): a key tile's K and V slots freed by
# one arrive after its P·V, not two (each arrive is a warpgroup bar.sync in Triton's lowering; ncu put 33-38% of the
# consumers' stall cycles at such barriers). GPU tests first, then the no-gradient forward (generation's encoder) and
# the training forward with dropout (wstrain, in CUDA-graph GPU time) with and without it, rings of 2 and 3; and the
# ws dK/dV kernel (wsbwd), whose Q and dO slots are now freed by one arrive a tile instead of two.
. scripts/device/prelude.sh
step ws_tests 170 python3 -m pytest -m gpu tests/test_fast_t5_ws_forward.py tests/test_fast_t5_ws_backward.py $XDIST -q \
  -x -k "onerelease or lean or ring or gpu_ws_backward"
step ws_nograd 90 python3 benchmarks/attention_kernels.py --inference --no-flex \
  --shapes 16x32x4096x128 64x32x1024x128 --kernels cudnn,triton+bias --patches wsenc3,wsonerelease,wsonerelease:wsenc3 \
  --tag onerelease
step ws_train 90 python3 benchmarks/attention_kernels.py --no-flex --shapes 32x32x1024x128 \
  --kernels cudnn,triton+bias+dropout --patches wstrain,wstrain:wsonerelease:wsenc3,wsbwd --timing graph \
  --tag onerelease-train
