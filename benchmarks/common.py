"""Shared by the benchmarks: the machine's description, subprocess runs of alexdist.train, result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import machine  # noqa: E402 (after the sys.path line)

from alexdist.distributed.launcher import launch_command  # noqa: E402


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    e.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
             ALEXDIST_CACHE=e.get("ALEXDIST_CACHE", str(Path(tempfile.gettempdir()) / "alexdist-bench-cache")))
    return e


def error_line(stderr: str) -> str:
    """What went wrong, as the user would want it: alexdist's one line, else the Python exception's last line (not
    torchrun's ChildFailedError wrapper), else the last line."""
    import re

    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    ours = [line for line in lines if "alexdist: error:" in line]
    if ours:
        return ours[0][ours[0].index("alexdist: error:"):]
    wrapper = re.compile(r"ChildFailedError|CalledProcessError|elastic|subprocess|launch\.py")
    exc = [line for line in lines if re.match(r"^(\[rank\d+\]:\s*)?[\w.]+(Error|Exception|StopIteration)\b", line)
           and not wrapper.search(line)]
    return (exc[-1] if exc else lines[-1] if lines else "no output")[:300]


def train_run(overrides: list[str], nproc: int = 1, timeout: int = 900) -> dict:
    """Run `alexdist.train` (1 process, or N CPU/GPU processes through accelerate launch) in a fresh output_dir;
    return its summary plus the events of metrics.jsonl."""
    with tempfile.TemporaryDirectory() as out:
        cmd = launch_command(["quickstart", *overrides, f"output_dir={out}", "tracking.wandb=false"], nproc,
                             "accelerate" if nproc > 1 else "python")
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        result = json.loads((Path(out) / "summary.json").read_text())
        result["events"] = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return result


def train_images_per_s(result: dict) -> float:
    """Images/s of the run's training epochs (evaluation excluded), from its own `train` events."""
    ev = [e for e in result["events"] if e["event"] == "train"]
    return sum(e["images_per_s"] for e in ev) / len(ev)


def steady_images_per_s(result: dict) -> float:
    """Images/s from the run's `step` events (needs train.log_every=1), first step excluded: the per-step rate
    without one-time costs (lazy imports, allocator warm-up), which the epoch's figure includes."""
    times = [e["time"] for e in result["events"] if e["event"] == "step"]
    return (len(times) - 1) * result["effective_batch"] / (times[-1] - times[0])


def write(name: str, data: dict, lines: list[str], command: str) -> str:
    """benchmarks/results/NAME.json (with the machine and commit) and NAME.md; returns the Markdown."""
    data = {"_machine": machine(), "_command": command, **data}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    m = data["_machine"]
    head = [f"# {name}", "", f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, accelerate "
            f"{m['accelerate']}, deepspeed {m['deepspeed']}; commit {m['git_commit']}. Command: `{command}`.", ""]
    text = "\n".join(head + lines) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    return text
