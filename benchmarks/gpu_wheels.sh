#!/usr/bin/env bash
# The wheels the GPU machine lacks, made here (it has no package index): -> .whl/, which git ignores.
#   bash benchmarks/gpu_wheels.sh      then carry [".whl"] in the device call that runs benchmarks/gpu_check.sh
# DeepSpeed ships only an sdist on PyPI: `pip wheel` builds its pure-Python wheel (ops are JIT-built when used;
# ZeRO with alexdist's torch optimizer uses none). pydantic's core is compiled: the wheel for the GPU machine's
# Python 3.12 on x86-64 is downloaded, not built.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl "deepspeed==$(version deepspeed)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
  "typing-inspection==$(version typing-inspection)" "typing-extensions==$(version typing-extensions)" \
  "hjson==$(version hjson)"
ls -la .whl
