# Call 3: the long config (4096/512) with `bwdlean:dsfma:pcvt` and without the lean forward; the attention GPU tests under
# the defaults (the new ones for `dsfma` and `pcvt` among them).
. scripts/device/prelude.sh
step long_leanbwd 380 python3 benchmarks/long_documents.py --lengths 4096/512 \
  --sumtune "config,config:bwdlean:dsfma:pcvt,config:nofwdlean" --reference "" --steps 8
step gpu_attention_tests 160 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_t5_attention.py
