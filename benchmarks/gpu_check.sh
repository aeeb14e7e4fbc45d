#!/usr/bin/env bash
# The GPU check in one call (see benchmarks/gpu_check.py): rows written to $OUT/gpu_check.{md,jsonl} as they finish.
#
#   bash benchmarks/gpu_wheels.sh           # here, once: the wheels the GPU machine lacks -> .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh            # there, with .whl carried: ~7 minutes, each row capped at 120 s
#   bash benchmarks/gpu_check.sh --cpu      # a dry run on a CPU: tiny runs, CUDA-only rows skipped (CI runs it)
#
# The GPU machine has torch and accelerate but not pydantic, hjson or deepspeed: they come from .whl/, installed
# without an index into /tmp/site. Whatever is already importable there is not shadowed by an older wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PY:-python3}
DRY=0
[ "${1:-}" = "--cpu" ] && DRY=1
if [ $DRY = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ $DRY = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then  # the wheels are for the GPU machine's Python 3.12
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p "$OUT"
"$PY" - <<'PY'
import importlib.util
need = ("torch", "accelerate", "pydantic", "safetensors", "yaml", "tqdm", "deepspeed", "hjson")
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("gpu_check: missing", missing or "nothing")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/nvidia-smi.txt" || true
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
