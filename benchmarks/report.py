"""Markdown summaries of benchmark results: python benchmarks/report.py NAME -> benchmarks/results/NAME.md"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import accelerate
    import torch

    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "accelerate": accelerate.__version__,
            "deepspeed": ds, "python": platform.python_version(), "git_commit": commit or None}


def zero_memory(data: dict) -> str:
    mb = 1 / 2**20
    lines = ["| strategy | params / rank (MiB) | grads / rank (MiB) | optimizer state / rank (MiB) "
             "| total / rank (MiB) "
             "| checkpoint (MiB) | save (s) | load (s) | resume on another world size |",
             "|---|---|---|---|---|---|---|---|---|"]
    # What a checkpoint of each strategy can resume on (tests: test_resume.py, test_zero_equivalence.py, test_fsdp.py).
    reshard = {"ddp": "yes (whole weights + optimizer)", "fsdp": "yes (DCP reshards, optimizer included)",
               "zero1": "yes (universal checkpoint)", "zero2": "yes (universal checkpoint)"}
    for name in ("ddp", "zero1", "zero2", "zero3", "fsdp"):
        if name not in data:
            continue
        r = data[name]
        p = r["per_rank"][0]
        c = r["checkpoint"]
        total = p["params_bytes"] + p["grad_bytes"] + p["optimizer_bytes"]
        lines.append(f"| {name} | {p['params_bytes'] * mb:.1f} | {p['grad_bytes'] * mb:.1f} "
                     f"| {p['optimizer_bytes'] * mb:.1f} "
                     f"| {total * mb:.1f} | {c['bytes'] * mb:.1f} | {c['save_s']:.2f} | {c['load_s']:.2f} "
                     f"| {reshard.get(name, 'no (export the weights; optimizer state lost)')} |")
    base = next(iter(data.values()))["plain_safetensors"]
    lines.append("")
    lines.append(f"Baseline: one safetensors file of the same weights: {base['bytes'] * mb:.1f} MiB, save "
                 f"{base['save_s']:.2f} s, load {base['load_s']:.2f} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    name = sys.argv[1]
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text())
    data["_machine"] = machine()
    path.write_text(json.dumps(data, indent=2) + "\n")
    body = {"zero_memory": zero_memory}[name]({k: v for k, v in data.items() if not k.startswith("_")})
    m = data["_machine"]
    header = (f"# {name}\n\nMachine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, accelerate {m['accelerate']}, "
              f"deepspeed {m['deepspeed']}; commit {m['git_commit']}.\n\n")
    (RESULTS / f"{name}.md").write_text(header + body + "\n")
    print(header + body)
