# Call 3 (any card, ~150 s): the GPU tests of the two levers session 45's call 2 measured faster together (whole
# generation at 256 rows, H100: 13.11 vs 12.48 summaries/s, tokens equal): the warp-specialized decoding kernel
# unsplit (decodews32) and the ws forward's far tiles in the exponent's FFMA (wslean, whose test has not run yet).
. scripts/device/prelude.sh
step decodews_test 90 python3 -m pytest -q $XDIST -m gpu tests/test_gluon_decode_ws.py -p no:cacheprovider
step wslean_test 200 python3 -m pytest -q $XDIST -m gpu tests/test_fast_t5_ws_forward.py -k "ring2 or lean" \
  -p no:cacheprovider
