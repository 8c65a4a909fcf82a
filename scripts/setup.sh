#!/usr/bin/env bash
# Set up (or refresh) .venv with sumtune and the tested dependency versions. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.6"        # the CUDA build for this GPU
  else
    python -m pip install -q "torch==2.13.0"     # CPU machines: the pinned release (a local CPU build where present)
  fi
fi
python -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored: it is neither" || true
python -m pip install -q --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
python -c "import sumtune, torch, transformers, peft, bitsandbytes" # fail here, not later, if anything is missing
