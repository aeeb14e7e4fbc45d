"""The launcher dies (SIGKILL: an OOM kill, a closed session, a crashed agent) and its workers must not live on:
during setup they exit within seconds; during training they checkpoint at the next step and exit, and the
relaunch resumes at once and ends with the uninterrupted run's weights. DDP, ZeRO-2 and FSDP2 on 2 CPU ranks,
started as a user would: `accelerate launch --multi_gpu --num_processes 2`."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
import torch
from conftest import ROOT, check, launch, launch_command, read_jsonl, run_env, summary, wait_for_step
from safetensors.torch import load_file

from alexdist.distributed.processes import children_of

pytestmark = pytest.mark.slow

RUN = ["train.epochs=2", "checkpoint.every_steps=5", "tracking.wandb=false", "train.log_every=1"]
STRATEGIES = {"ddp": [], "zero2": ["distributed.strategy=deepspeed", "distributed.zero_stage=2"],
              "fsdp": ["distributed.strategy=fsdp"]}


def _kill_launcher(proc: subprocess.Popen) -> tuple[list[int], float]:
    """SIGKILL the launcher alone; (its workers, seconds until none of them is left)."""
    workers = children_of(proc.pid)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    while time.time() - t0 < 60 and any(_alive(w) for w in workers):
        time.sleep(0.05)
    return workers, time.time() - t0


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("name", STRATEGIES)
def test_killing_the_launcher_in_training_stops_the_workers_and_the_relaunch_resumes(name, tmp_path, cache_dir):
    extra = STRATEGIES[name]
    ref, run = tmp_path / "ref", tmp_path / "run"
    check(launch(RUN + extra + [f"output_dir={ref}"], cache_dir, nproc=2))
    proc = subprocess.Popen(launch_command(RUN + extra + [f"output_dir={run}"], 2), cwd=ROOT, env=run_env(cache_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(run, 12)
    workers, gone = _kill_launcher(proc)
    print(f"\n{name}: launcher killed in training -> workers gone in {gone:.2f} s")
    assert len(workers) == 2 and gone < 10 and not any(_alive(w) for w in workers)
    stop = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "stop"]
    assert len(stop) == 1 and stop[0]["reason"] == "the launcher died (SIGTERM)"
    check(launch(RUN + extra + [f"output_dir={run}"], cache_dir, nproc=2))  # the lock is free: resumes at once
    assert summary(run)["resumed_at_step"] == stop[0]["step"]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm statistics included


@pytest.mark.parametrize("name", STRATEGIES)
def test_killing_the_launcher_in_setup_ends_the_workers_within_seconds(name, tmp_path, cache_dir):
    run = tmp_path / "run"
    # Rank 0 decodes the data 60 s slower: rank 1 waits for it in a collective (an orphan would sit there for
    # distributed.setup_timeout_s, 30 minutes).
    env = run_env(cache_dir, ALEXDIST_FAULT="slow_setup:60")
    proc = subprocess.Popen(launch_command(RUN + STRATEGIES[name] + [f"output_dir={run}"], 2), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(12)  # the workers are importing and forming the group
    workers, gone = _kill_launcher(proc)
    print(f"\n{name}: launcher killed in setup -> workers gone in {gone:.2f} s")
    assert len(workers) == 2 and gone < 10
    check(launch(RUN + STRATEGIES[name] + ["train.max_steps=2", f"output_dir={run}"], cache_dir, nproc=2))
