#!/usr/bin/env bash
# The wheels a GPU machine may lack, made where pip reaches a package index (the GPU machine may not): -> .whl/,
# which git ignores.
#   bash benchmarks/gpu_wheels.sh      then copy .whl/ into the clone on the GPU machine, beside benchmarks/
# Works on a fresh clone: the versions are the venv's when there is one, else the ones pinned below (those CI
# tests with). gpu_check.sh installs a wheel only where the image lacks the package or has it below its floor.
# DeepSpeed ships only an sdist on PyPI: `pip wheel` builds its pure-Python wheel (ops are JIT-built when used;
# ZeRO with alexdist's torch optimizer uses none). Compiled packages (pydantic-core) are downloaded for the GPU
# machine's Python 3.12 on x86-64, not built.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
declare -A PIN=([deepspeed]=0.19.8 [pydantic]=2.14.4 [pydantic-core]=2.50.5 [annotated-types]=0.8.0
                [typing-inspection]=0.4.5 [typing-extensions]=4.16.0 [hjson]=3.1.0 [timm]=1.0.31)
version() {  # the venv's version of $1 if there is a venv, else the pin (never a system Python's mix)
  [ -x .venv/bin/python ] && .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null \
    || echo "${PIN[$1]}"
}
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl "deepspeed==$(version deepspeed)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
  "typing-inspection==$(version typing-inspection)" "typing-extensions==$(version typing-extensions)" \
  "hjson==$(version hjson)" "timm==$(version timm)"
ls -la .whl
