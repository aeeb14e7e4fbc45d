"""Shared helpers: launch real training runs (1 or 2 CPU processes) and read what they wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One dataset cache for the session: digits are decoded once, later runs load the cache."""
    return tmp_path_factory.mktemp("alexdist-cache")


def run_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(
        ALEXDIST_CACHE=str(cache_dir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def launch_command(
    overrides: list[str],
    nproc: int = 1,
    launcher: str = "accelerate",
    recipe: str = "recipes/quickstart.yaml",
    config_file: str | None = None,
) -> list[str]:
    """The command a user would type: `accelerate launch --multi_gpu` / `torchrun` for 2 CPU ranks,
    `accelerate launch --config_file` with one of recipes/accelerate/*.yaml, or plain `python -m`."""
    if config_file:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
               "--num_processes", str(nproc), "--main_process_port", str(free_port()), "-m", "alexdist.train"]
    elif launcher == "accelerate" and nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "alexdist.train"]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "alexdist.train"]
    else:
        cmd = [sys.executable, "-m", "alexdist.train"]
    return cmd + [recipe, *overrides]


def launch(
    overrides: list[str],
    cache_dir: Path,
    nproc: int = 1,
    launcher: str = "accelerate",
    recipe: str = "recipes/quickstart.yaml",
    env: dict[str, str] | None = None,
    timeout: int = 420,
    config_file: str | None = None,
) -> subprocess.CompletedProcess:
    """Run alexdist.train to completion through `launch_command`."""
    return subprocess.run(
        launch_command(overrides, nproc, launcher, recipe, config_file), cwd=ROOT, env=env or run_env(cache_dir),
        capture_output=True, text=True, timeout=timeout,
    )


def wait_for_step(run_dir: Path, step: int, timeout: float = 240) -> None:
    """Block until metrics.jsonl records an optimizer step >= `step`."""
    import time

    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) >= step:
                        return
                except json.JSONDecodeError:
                    continue  # the line being written right now
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir} did not reach step {step} in {timeout} s")


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


WALL_CLOCK = {"time", "epoch_time_s", "images_per_s", "elapsed_s"}


def comparable_events(run_dir: Path) -> list[dict]:
    """metrics.jsonl without start/stop events and wall-clock fields: what must match between two runs."""
    return [{k: v for k, v in e.items() if k not in WALL_CLOCK} for e in read_jsonl(run_dir / "metrics.jsonl")
            if e["event"] not in ("start", "stop")]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
