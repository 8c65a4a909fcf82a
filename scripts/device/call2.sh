# Call 2 (any card, ~480 s): ws_forward.DRAW_IN_PRODUCER (session 50, CPU-built only so far): the training forward's
# keep mask drawn a tile ahead by the producer partition (four warps instead of one) into a shared-memory ring of
# nibbles, so the consumers' latency-bound loop loses its 16 Philox calls a thread and tile (session 48's ncu: dropout
# doubles the consumers' instructions). GPU tests (exact keep counts, bit-equal output to the consumers' draws), then
# the training forward + backward in CUDA graphs against the shipped Triton forward and cuDNN (issue 15's yardstick),
# and the seed's step at b24 with the ws training forward (with and without the producer's draws) against the shipped.
. scripts/device/prelude.sh
step draw_tests 200 python3 -m pytest -m gpu tests/test_fast_t5_ws_forward.py $XDIST -q -k "training"
step draw_train 100 python3 benchmarks/attention_kernels.py --no-flex --shapes 32x32x1024x128 \
  --kernels cudnn,triton+bias+dropout --patches wstrain,wstrain:wsdraw --timing graph \
  --tag wsdraw-train
F=group:fusedlora:loragemm:cache
step draw_seed 260 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "b24:$F,b24:$F:wstrain:wsdraw,b24:$F:wstrain" --warmup 6 --steps 16
