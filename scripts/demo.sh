#!/usr/bin/env bash
# Set up, then run the whole job offline: `sumtune demo` (tiny T5, NF4, QLoRA, ROUGE before and after).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/sumtune demo "$@"
