#!/usr/bin/env bash
# GPU check in one call: fp16/bf16 training steps, DDP and DeepSpeed ZeRO-2 on 1 GPU, channels_last/compile,
# throughput against a bare PyTorch loop -> $OUT/gpu_check.{md,json}. See benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine; writes under $OUT (default: ./gpu_check_out)
#   bash benchmarks/gpu_check.sh --cpu      # dry run on a CPU (fp32 + bf16, tiny model, 8 steps)
#
# The device image has torch and accelerate but not deepspeed, wandb or alexdist's small dependencies: carry
# them as wheels in .whl/ (ignored by git, see /work/.library/device/README.md), e.g. here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     deepspeed==0.19.8 hjson ninja py-cpuinfo msgpack
#   (deepspeed is a source distribution on PyPI: build its wheel with `pip wheel --no-deps deepspeed==0.19.8 -w .whl`)
# and run with carry [".whl"]. Whatever of them is already importable is not installed again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PY:-python3}
[ -x .venv/bin/python ] && [ "${1:-}" = "--cpu" ] && PY=.venv/bin/python
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
"$PY" - <<'PY'
import importlib.util
missing = [m for m in ("torch", "accelerate", "pydantic", "safetensors", "yaml", "tqdm", "deepspeed") if importlib.util.find_spec(m) is None]
print("gpu_check: missing", missing if missing else "nothing")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
"$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
