#!/usr/bin/env bash
# The GPU check in one call (see benchmarks/gpu_check.py): rows written to $OUT/gpu_check.{md,jsonl} as they finish.
#
#   bash benchmarks/gpu_wheels.sh           # on a machine with a package index: the wheels a GPU machine may
#                                           # lack -> .whl/ (git-ignored); copy the folder along with the clone
#   bash benchmarks/gpu_check.sh            # on the GPU machine: ~8 minutes, each row capped at 120 s
#   bash benchmarks/gpu_check.sh --cpu      # a dry run on a CPU: tiny runs, CUDA-only rows skipped (CI runs it)
#
# First, in seconds: benchmarks/gpu_deps.py decides package by package whether the installed copy will do (at or
# above its floor) or a wheel from .whl/ is needed, installs only those into /tmp/site, and stops with exit 2 and
# one line when something needed is in neither place. Without DeepSpeed only the DeepSpeed rows are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
DRY=0
[ "${1:-}" = "--cpu" ] && DRY=1
if [ $DRY = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
mkdir -p "$OUT"
EXTRA=()
if [ $DRY = 0 ]; then
  rm -rf /tmp/site && mkdir -p /tmp/site
  ds=$("$PY" benchmarks/gpu_deps.py "$WHEELS" /tmp/site 2> >(tee "$OUT/packages.txt" >&2)) || exit 2
  [ "$ds" = "deepspeed: skip" ] && EXTRA+=(--no-deepspeed)
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/nvidia-smi.txt" || true
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "${EXTRA[@]}" "$@"
