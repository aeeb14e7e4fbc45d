"""Time from a stop request to a checkpointed, exited run, against the bound "one optimizer step + one save".

    .venv/bin/python benchmarks/stop_latency.py      # -> benchmarks/results/stop_latency.{json,md}

Each trial launches a 2-process DDP run (accelerate launch --multi_gpu on CPU), waits until it has trained a
few steps, writes output_dir/STOP (what slurm/train.sh does on USR1), and times until the launcher has exited.
The step time comes from the run's own metrics.jsonl; the save time from timing the same checkpoint again.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alexdist.distributed.launcher import launch_command
from alexdist.fileio import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {
    # name: overrides (quickstart recipe); alexnet_bn at full width makes steps and checkpoints non-trivial
    "quickstart (0.9 M params, digits)": [],
    "alexnet_bn (14.7 M params, synthetic)": ["model.width_mult=1.0", "data.source=synthetic",
                                             "data.synthetic_train=4096", "data.synthetic_test=256",
                                             "train.batch_size=16"],
}


def _events(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return read_jsonl(path) if path.is_file() else []


def trial(overrides: list[str], wait_steps: int = 8) -> dict:
    run = Path(tempfile.mkdtemp(prefix="stop-latency-")) / "run"
    cmd = launch_command(["quickstart", "tracking.wandb=false", "train.log_every=1", f"output_dir={run}", *overrides],
                         nproc=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any(e.get("event") == "step" and e["step"] >= wait_steps for e in _events(run)):
        if proc.poll() is not None:
            raise RuntimeError("the run ended before the stop request")
        time.sleep(0.05)
    t0 = time.time()
    (run / "STOP").touch()
    proc.wait(timeout=600)
    latency = time.time() - t0
    steps = [e for e in _events(run) if e["event"] == "step"]
    step_times = [b["time"] - a["time"] for a, b in itertools.pairwise(steps) if b["step"] == a["step"] + 1]
    stop = next(e for e in _events(run) if e["event"] == "stop")
    ckpt_bytes = sum(f.stat().st_size for f in Path(stop["checkpoint"]).rglob("*") if f.is_file())
    return {"latency_s": latency, "step_s": statistics.median(step_times), "stopped_at_step": stop["step"],
            "requested_after_step": wait_steps, "checkpoint_bytes": ckpt_bytes, "exit_code": proc.returncode}


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import machine

    results = {"_machine": machine()}
    for name, overrides in CONFIGS.items():
        trials = [trial(overrides) for _ in range(3)]
        results[name] = {"trials": trials, "median_latency_s": statistics.median(t["latency_s"] for t in trials),
                         "median_step_s": statistics.median(t["step_s"] for t in trials)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stop_latency.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["_machine"]
    lines = ["# stop_latency", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, accelerate {m['accelerate']}; commit "
             f"{m['git_commit']}. Command: `.venv/bin/python benchmarks/stop_latency.py`.", "",
             "STOP file written -> all ranks agree at the next step boundary -> checkpoint -> launcher exited.", "",
             "| run | median latency (s) | median step (s) | steps past the request | checkpoint (MiB) |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        past = statistics.median(t["stopped_at_step"] - t["requested_after_step"] for t in r["trials"])
        mib = statistics.median(t["checkpoint_bytes"] for t in r["trials"]) / 2**20
        lines.append(f"| {name} | {r['median_latency_s']:.2f} | {r['median_step_s']:.3f} | {past:.0f} | {mib:.1f} |")
    (RESULTS / "stop_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
