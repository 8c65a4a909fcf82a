# Session 48, any card (~200 s): issue 15's attention yardstick timed two ways in one call: events around eager calls
# with a sync after each (as every earlier figure: the host's launch path before the first kernel included; ncu put
# the ws training forward's kernel at 2.42 ms where that method read 2.97) and replays of CUDA graphs (GPU time, as
# the training step runs it).
. scripts/device/prelude.sh
step yardstick_graph 150 python3 benchmarks/attention_kernels.py --no-flex --shapes 32x32x1024x128 4x32x4096x128 \
  --kernels cudnn,cudnn+dropout,triton+bias+dropout --patches wstrain --timing graph --tag graph
step yardstick_events 120 python3 benchmarks/attention_kernels.py --no-flex --shapes 32x32x1024x128 4x32x4096x128 \
  --kernels cudnn,cudnn+dropout,triton+bias+dropout --patches wstrain --timing events --tag events
