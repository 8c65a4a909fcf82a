# Session 48, an H100 (~250 s): Nsight Compute on the warp-specialized attention forward at 32x32x1024x128 with T5's
# bias: the training form (dropout 0.1, wstrain) and the no-gradient form, each kernel's first two launches: which
# pipe binds (session 48's SASS counts suggest the ALU pipe, not the tensor cores), and the warps' stall reasons.
. scripts/device/prelude.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: ${NCU:-none}"
SECTIONS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats"
SECTIONS="$SECTIONS --section InstructionStats --section LaunchStats --section Occupancy"
METRICS="regex:sm__pipe_.*_cycles_active.avg.pct_of_peak_sustained_active"
METRICS="$METRICS,regex:sm__inst_executed_pipe_.*.avg.pct_of_peak_sustained_active"
step ncu_ws_train 170 $NCU --clock-control none --kernel-name t5_ws_fwd --launch-count 2 $SECTIONS \
  --metrics "$METRICS" python3 benchmarks/attention_kernels.py --no-flex --shapes 32x32x1024x128 \
  --kernels triton+bias+dropout --patches wstrain --repeats 2
step ncu_ws_nograd 120 $NCU --clock-control none --kernel-name t5_ws_fwd --launch-count 2 $SECTIONS \
  --metrics "$METRICS" python3 benchmarks/attention_kernels.py --inference --no-flex --shapes 32x32x1024x128 \
  --kernels triton+bias --repeats 2
