# Call 4 (any card, ~480 s): the warp-specialized no-gradient forward (fast_t5.ws_forward, token wsenc, off until
# measured): its GPU test (both ring sizes) against float64 and the Triton forward; the op's no-gradient forward with
# T5's bias and padding at the encoder's shapes, Triton against wsenc and wsenc:wsenc3, cuDNN without bias beside; then
# whole generation with every input 4096 tokens at 256 rows under wsenc, tokens against transformers first.
. scripts/device/prelude.sh
step ws_gpu_test 150 python3 -m pytest -q -m gpu tests/test_fast_t5_ws_forward.py -p no:cacheprovider
step ws_kernels 120 python3 benchmarks/attention_kernels.py --inference --no-flex --shapes 16x32x4096x128 \
  64x32x1024x128 --kernels cudnn,triton+bias --patches wsenc,wsenc:wsenc3 --tag ws
step ws_generate 230 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 1 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches wsenc,wsenc:wsenc3
