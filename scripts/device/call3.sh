# Call 3 (any card, ~250 s): probe .probe/ws_forward.py (git-ignored, carried): FlashAttention-3's structure in Gluon
# (a producer warp, two consumer warpgroups of 64 query rows, gl.warp_specialize), no bias, no mask, against cuDNN's
# forward without a bias and sumtune's shipped forward with T5's bias, at 16x32x4096x128 and 64x32x1024x128; outputs
# against float32 SDPA first. The ceiling question: if this cannot reach cuDNN, a T5-bias version cannot either.
. scripts/device/prelude.sh
step ws_probe 240 python3 .probe/ws_forward.py --out "$OUT/results"
