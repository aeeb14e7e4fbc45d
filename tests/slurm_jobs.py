"""Jobs on a real Slurm cluster (slurm/local/start_local_slurm.sh starts one, CI two nodes): the helpers of
tests/e2e/test_slurm.py and tests/e2e/test_slurm_two_nodes.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, run_env

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def slurm_nodes() -> int:
    """How many nodes an answering Slurm cluster has (0: none answers)."""
    if not shutil.which("sbatch"):
        return 0
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    if "UP" not in ping.stdout:
        return 0
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=False).stdout
    return len(set(out.split()))


def require_slurm(nodes: int = 1) -> None:
    """Skip without a cluster of `nodes` nodes, or fail when CI says one must be there."""
    if slurm_nodes() >= nodes:
        return
    wanted = int(os.environ.get("ALEXDIST_REQUIRE_SLURM", "0") or 0)
    if wanted >= nodes:
        pytest.fail(f"ALEXDIST_REQUIRE_SLURM={wanted} but no Slurm cluster of {nodes} node(s) answers")
    pytest.skip(f"no Slurm cluster of {nodes} node(s); start one: bash slurm/local/start_local_slurm.sh start "
                f"--nodes {nodes}")


def slurm_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = run_env(cache_dir, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the job runs this venv's alexdist
    return env


def sbatch(run: Path, cache_dir: Path, args: list[str], sbatch_args: tuple = (), wait: bool = False,
           env: dict[str, str] | None = None) -> tuple[str, subprocess.CompletedProcess]:
    """`sbatch slurm/train.sh ARGS output_dir=RUN`, its log in RUN.slurm.log; (job id, sbatch's process)."""
    cmd = ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={run}.slurm.log", *sbatch_args]
    cmd += ["--wait"] if wait else []
    quiet = [] if any(a.startswith("eval.confusion_png=") for a in args) else ["eval.confusion_png=false"]
    proc = subprocess.run(cmd + ["slurm/train.sh", *args, *quiet, f"output_dir={run}"], env=env or slurm_env(cache_dir),
                          capture_output=True, text=True, timeout=900, check=False)
    return proc.stdout.strip().split(";")[0], proc


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=False).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_finished(job: str, timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=False)
    raise TimeoutError(f"job {job} did not finish in {timeout} s: {job_info(job)}")


def leftover(pattern: str, timeout: float = 30) -> list[str]:
    """Processes whose command line matches `pattern` once they have had `timeout` seconds to go (a job's steps
    can outlive its CANCELLED state by a moment; how long depends on the machine's load)."""
    deadline = time.time() + timeout
    while True:
        left = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)
