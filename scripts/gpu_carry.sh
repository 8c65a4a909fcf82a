#!/usr/bin/env bash
# Developers only: prepare what a lent GPU machine lacks, for the device tool's `carry`.
#   .whl/          bitsandbytes and rouge_score (+ its needs) as cp312 wheels (the GPU image has neither), and
#                  pytest-xdist: the GPU tests build their kernels in parallel (-n 4; the builds take most of a step)
#   .shared_data/  a copy of ../shared/data (BillSum rows, T5 tokenizer) for benchmarks and GPU tests
# Both are git-ignored through .git/info/exclude. On the device, start each command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 SUMTUNE_SHARED_DATA=$PWD/.shared_data
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
for path in /.whl/ /.shared_data/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  bitsandbytes==0.50.2 nltk absl-py regex joblib click pytest pluggy iniconfig \
  pytest-xdist==3.8.0 execnet==2.1.2 2>&1 | grep -v "is ignored" || true
python3 -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2 2>&1 | grep -v "is ignored" || true  # an sdist on PyPI
shared=${SUMTUNE_SHARED_DATA:-../shared/data}
rm -rf .shared_data && mkdir .shared_data && cp -r "$shared/billsum" "$shared/t5-tokenizer" .shared_data/
du -sh .whl .shared_data
