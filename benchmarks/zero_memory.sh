#!/usr/bin/env bash
# Per-rank memory of DDP vs ZeRO-1/2/3 vs FSDP2 and checkpoint cost, 2 CPU ranks -> benchmarks/results/zero_memory.{json,md}
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=benchmarks/results/zero_memory.json
mkdir -p benchmarks/results
rm -f "$out"
for s in ddp zero1 zero2 zero3 fsdp; do
  work=$(mktemp -d)
  OMP_NUM_THREADS=1 "$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
    --mixed_precision no --dynamo_backend no benchmarks/zero_memory.py --strategy "$s" --out "$out" --workdir "$work"
  rm -rf "$work"
done
"$PY" benchmarks/report.py zero_memory
