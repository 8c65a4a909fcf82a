# Call 1: the GPU tests not yet run (ENCODER_AHEAD, LEAN_BACKWARD), then whole generation at full length over two
# 256-row batches with the encoder run ahead on a side stream, the token check against transformers first.
. scripts/device/prelude.sh
step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_generation.py \
  tests/test_fast_t5_attention.py -k "encoder_ahead or cuda_graphs_match or gpu_lean_backward or gpu_ds_from_dropped or gpu_fwd_cvt"
step generate_ahead 420 python3 benchmarks/generate_throughput.py --model t5-3b --source-tokens 4096 \
  --new-tokens 512 --full-length --greedy-only --fast-batches 256 --timed-batches 2 --reference-batches "" \
  --agreement-inputs 2 --agreement-first --patches encoderahead,encoderahead:decodefirst
