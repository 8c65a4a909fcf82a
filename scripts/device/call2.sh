# Call 2: the attention kernels as training runs them under the lean dK/dV loops, dS from the dropped P (`dsfma`),
# the forward's P by inline PTX (`pcvt`), all three, and all three with the wide Philox products at 1024 keys
# (`widemulall`); then the seed's best settings with all four and without the lean forward, 30 timed steps each, each row's kernel table
# (--profile: whether the lean forward's 17% shows in the step's own attention kernels; session 36's A/B read
# 0.6424 against 0.6423 s a step, where ~2% was expected).
. scripts/device/prelude.sh
step attention_leanbwd 200 python3 benchmarks/attention_kernels.py --shapes 32x32x1024x128 --no-flex \
  --kernels cudnn,triton+bias+dropout --patches bwdlean,dsfma,pcvt,bwdlean:dsfma:pcvt,bwdlean:dsfma:pcvt:widemulall --repeats 20 --tag leanbwd-dsfma-pcvt-train
step seed_leanbwd 340 python3 benchmarks/train_throughput.py --config configs/seed.yaml --reference "" \
  --fast "b32:group:fusedlora:loragemm:cache,b32:group:fusedlora:loragemm:cache:bwdlean:dsfma:pcvt:widemulall,b32:group:fusedlora:loragemm:cache:nofwdlean" \
  --warmup 8 --steps 30 --profile
