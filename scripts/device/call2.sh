# Call 2: the long config (4096/512) with and without the lean dK/dV loops; the shipped config likewise.
. scripts/device/prelude.sh
step long_leanbwd 330 python3 benchmarks/long_documents.py --lengths 4096/512 --sumtune "config,config:nobwdlean" \
  --reference "" --steps 8
step shipped_leanbwd 220 python3 benchmarks/train_throughput.py --config configs/t5-3b-billsum.yaml --reference "" \
  --fast "config,config:nobwdlean" --warmup 8 --steps 24
