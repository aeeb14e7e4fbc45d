"""A hang-up (SIGHUP) and `nohup`. A run whose SIGHUP is ignored when it starts (`nohup`) outlives the terminal: the
hang-up changes nothing and the run goes on to its end, one process or a launcher's workers. A hang-up that is
not ignored is a stop request like SIGTERM, named as a hang-up, not as a launcher death: the launcher-death guard
has a signal of its own (tests/e2e/test_launcher_death.py), which `nohup` does not touch.

`accelerate launch` (torchrun inside) replaces nohup's ignored SIGHUP with a handler of its own before it starts
the workers (torchrun's `--signals_to_handle` default includes SIGHUP), so its workers never inherit the ignore,
and it passes a hang-up it receives on to them. `torchrun --signals_to_handle SIGTERM,SIGINT,SIGQUIT` leaves the
ignore in place, and its workers inherit it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from helpers import ROOT, launch_command, read_jsonl, run_env, summary, wait_for_step

STEPS = 40
ARGS = [f"train.max_steps={STEPS}", "checkpoint.every_steps=0", "tracking.wandb=false", "train.log_every=1"]


def _start(cmd: list[str], cache_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(["nohup", *cmd], cwd=ROOT, env=run_env(cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _workers(launcher: subprocess.Popen) -> list[int]:
    return [p.pid for p in psutil.Process(launcher.pid).children(recursive=True)
            if "alexdist.train" in " ".join(p.cmdline())]


def _stops(run: Path) -> list[dict]:
    return [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "stop"]


def _ran_to_its_end(proc: subprocess.Popen, run: Path) -> None:
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert not _stops(run)
    assert summary(run)["status"] == "max_steps" and summary(run)["steps"] == STEPS


def test_nohup_alexdist_train_ignores_a_hangup_and_runs_to_its_end(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = _start([sys.executable, "-m", "alexdist", "train", "recipes/quickstart.yaml", *ARGS,
                   f"output_dir={run}"], cache_dir)
    wait_for_step(run, 5)
    os.kill(proc.pid, signal.SIGHUP)  # nohup has exec'd the run: what the terminal sends it at logout
    _ran_to_its_end(proc, run)


def test_workers_that_inherit_an_ignored_sighup_ignore_a_hangup_sent_to_them(tmp_path, cache_dir):
    run = tmp_path / "run"
    cmd = launch_command(ARGS + [f"output_dir={run}"], 2, launcher="torchrun")
    at = cmd.index("torch.distributed.run") + 1
    cmd[at:at] = ["--signals_to_handle", "SIGTERM,SIGINT,SIGQUIT"]  # torchrun leaves nohup's ignore in place
    proc = _start(cmd, cache_dir)
    wait_for_step(run, 5)
    workers = _workers(proc)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGHUP)
    _ran_to_its_end(proc, run)


def test_a_hangup_that_accelerate_launch_passes_on_stops_its_workers_as_a_hangup(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = _start(launch_command(ARGS + [f"output_dir={run}"], 2), cache_dir)
    wait_for_step(run, 5)
    os.kill(proc.pid, signal.SIGHUP)  # the launcher catches it and sends it on to its workers
    proc.communicate(timeout=180)
    assert proc.returncode != 0  # 128 + SIGHUP: the launcher was ended by its signal
    stop = _stops(run)
    assert len(stop) == 1 and stop[0]["reason"] == "the terminal closed (SIGHUP)" and stop[0]["step"] < STEPS
    assert summary(run)["status"] == "stopped" and Path(stop[0]["checkpoint"]).is_dir()
