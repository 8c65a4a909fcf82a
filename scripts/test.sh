#!/usr/bin/env bash
# Set up, then run the test suite (CPU). Headless Chromium (for the report page test) comes from Debian's packages.
#   bash scripts/test.sh [PYTEST ARGS]            the tested pins, in .venv
#   bash scripts/test.sh --latest [PYTEST ARGS]   the newest versions pyproject.toml allows, in .venv-latest
#                                                 (torch stays the one scripts/setup.sh installs: see there)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --latest ]; then
  shift
  bash scripts/setup.sh --latest
  venv=.venv-latest
else
  bash scripts/setup.sh
  venv=.venv
fi
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: the report page test will be skipped"
fi
export HF_HUB_OFFLINE=1
# One worker a core (pytest-xdist), tests handed out as workers free up; where a GPU is, one process (the GPU tests
# would share one card). SUMTUNE_TEST_WORKERS=N sets the count, 0 runs the tests in this process.
workers=${SUMTUNE_TEST_WORKERS:-$(command -v nvidia-smi >/dev/null 2>&1 && echo 0 || echo auto)}
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider -n "$workers" --dist worksteal "$@"
