# Developers only: sourced at the start of a device call (see scripts/device/README.md).
#   SESSION=39 CALL=1 LIMIT=560; . scripts/device/prelude.sh; step NAME TIMEOUT_S CMD ...
# Installs the carried wheels (scripts/gpu_carry.sh makes them) into /tmp/site, points the benchmarks at the carried
# BillSum rows and tokenizer, and gives `step`: one command under its own time limit, its log (first line: the
# command and the tree it ran on) and every result file it wrote copied under $OUT.
set -u
: "${SESSION:?}" "${CALL:?}" "${LIMIT:=560}" "${OUT:=/tmp/out}"
START_S=$SECONDS
mkdir -p "$OUT/logs" "$OUT/results"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/logs/pip.log" 2>&1 || echo "prelude: wheel install failed (see logs/pip.log)"
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 SUMTUNE_SHARED_DATA=$PWD/.shared_data
export PATH=/tmp/site/bin:$PATH
TREE=$(cat .device_tree 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/logs/gpu.txt" 2>&1 || true
# GPU tests in 4 processes where the carried pytest-xdist imports: their kernel builds (CPU-bound, ~80 s a file in
# session 42) then run side by side on the 16 cores; in one process if it does not.
XDIST=""; python3 -c "import xdist" 2>/dev/null && XDIST="-n 4 --dist load"

step() {  # step NAME TIMEOUT_S CMD ...: skipped when the call's own limit would cut it short
  local name=$1 limit_s=$2; shift 2
  local left_s=$((LIMIT - (SECONDS - START_S)))
  if [ "$left_s" -lt 30 ]; then echo "step $name: skipped ($left_s s left)"; return 0; fi
  [ "$limit_s" -gt "$left_s" ] && limit_s=$left_s
  local log="$OUT/logs/s${SESSION}call${CALL}-$name.log" marker
  marker=$(mktemp)
  echo "# tree $TREE; limit ${limit_s}s; $*" > "$log"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit_s" "$@" >> "$log" 2>&1
  local rc=$?
  echo "step $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$log"
  find benchmarks/results -newer "$marker" -type f -name '*.json' -exec cp {} "$OUT/results/" \; 2>/dev/null
  tail -n 4 "$log"
  rm -f "$marker"
}
