#!/usr/bin/env bash
# Set up (or refresh) a virtualenv with sumtune. Safe to run again.
#   bash scripts/setup.sh            .venv         the tested pins (requirements.txt)
#   bash scripts/setup.sh --latest   .venv-latest  the newest versions pyproject.toml allows today (what a plain
#                                                  `pip install -e .` picks), refreshed on every run
# torch comes first, the same way for both: the CUDA build where a GPU is, else the CPU release 2.13.0 (a local
# CPU build on these machines). Everything else is then installed under a constraints file that pins the torch
# just installed: an unpinned torch, or any range that a newer release satisfies (asked by sumtune or by another
# package), would pull a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") mode=pinned venv=.venv ;;
  --latest) mode=latest venv=.venv-latest ;;
  *) echo "usage: bash scripts/setup.sh [--latest]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip_install() {  # pip's own exit status survives the filter (pipefail); the filter drops one harmless warning
  python -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip_install "torch>=2.11"       # the CUDA build for this GPU
  else
    pip_install "torch==2.13.0"     # CPU machines: the pinned release (a local CPU build where present)
  fi
fi
constraints="$venv/torch-constraint.txt"
echo "torch==$(python -c 'import importlib.metadata as m; print(m.version("torch"))')" > "$constraints"
if [ "$mode" = pinned ]; then
  pip_install -c "$constraints" -r requirements.txt
  pip_install --no-deps -e .
else
  # eager: every dependency, direct or not, moves to its newest allowed release; torch cannot (constraints)
  pip_install -c "$constraints" --upgrade --upgrade-strategy eager -e ".[test]"
fi
python -c "import sumtune, torch, transformers, peft, bitsandbytes" # fail here, not later, if anything is missing
# The versions this venv resolved, for the CI log (sumtune's own dependencies, as pyproject.toml lists them, plus
# the libraries under them whose majors have changed behaviour: huggingface_hub, tokenizers).
python - "$mode" <<'EOF'
import importlib.metadata as md
import re
import sys

names = [re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0] for req in md.requires("sumtune") or [] if "extra ==" not in req]
names += ["huggingface_hub", "tokenizers", "triton"]  # triton: the CPU interpreter tests of the attention kernels
found = []
for name in dict.fromkeys(names):
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        found.append(f"{name} (not installed)")
print(f"dependency versions ({sys.argv[1]} set, python {sys.version.split()[0]}): " + ", ".join(found))
EOF
