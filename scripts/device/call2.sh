# Call 2 (any card, ~150 s; session 51's plan): Nsight Compute on the 32-head warp-specialized decoding kernel
# (gluon_decode_ws) at 1024 rows x 4096 keys, the launch generation replays. Session 51 found the kernel held by each
# SM's rate (fewer programs lose most of the SMs' speed: NOTES); this says which stall holds it (waits on the states'
# "ready" barrier = prefetch too shallow; on the MMAs = the N = 16 products; on the slots' "empty" barrier = the
# consumers) before the next kernel change is built. 256 rows first (the shorter run), then 1024. Run in session 52 on
# an H100 (92d7a4c): DRAM-bound there, 93.5% of peak at 1024 rows (NOTES, session 52); kept as the recipe.
. scripts/device/prelude.sh
NCU="/usr/local/cuda/bin/ncu --clock-control none --kernel-name gluon_ws_hidden_cross_attention --launch-skip 2 \
  --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --section WarpStateStats --section SchedulerStats --section InstructionStats --section LaunchStats \
  --section Occupancy --metrics regex:sm__pipe_.*_cycles_active.avg.pct_of_peak_sustained_active"
step ncu_decode256 70 $NCU python3 benchmarks/decode_attention.py --launch-only --batches 256
step ncu_decode1024 110 $NCU python3 benchmarks/decode_attention.py --launch-only --batches 1024
