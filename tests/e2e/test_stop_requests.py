"""Stop requests: a signal or a STOP file -> every rank stops at the same step, checkpoints, exits 75; resume
continues as if nothing happened."""

import os
import signal
import subprocess

import psutil
import pytest
import torch
from helpers import ROOT, check, comparable_events, launch, launch_command, read_jsonl, run_env, summary, wait_for_step
from safetensors.torch import load_file

ARGS = ["tracking.wandb=false", "train.log_every=1", "train.max_steps=60"]


def _workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    out = {}
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "alexdist.train" in " ".join(p.cmdline()) and "RANK" in env:
            out[int(env["RANK"])] = p
    return out


def _stop_midway(run, cache_dir, how):
    proc = subprocess.Popen(launch_command(ARGS + [f"output_dir={run}"], nproc=2), cwd=ROOT, env=run_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 15)
    how(proc)
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def whole(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("stop") / "whole"
    check(launch(ARGS + [f"output_dir={run}"], cache_dir, nproc=2))
    return run


@pytest.mark.parametrize("how", ["SIGUSR1 to rank 1 only", "STOP file"])
def test_stop_request_checkpoints_on_every_rank_and_resume_matches_the_uninterrupted_run(
        whole, tmp_path, cache_dir, how):
    run = tmp_path / "pieces"

    def ask(proc):
        if how == "STOP file":
            (run / "STOP").touch()
        else:  # launchers don't forward SIGUSR1: signal one worker, the other must follow
            os.kill(_workers(proc)[1].pid, signal.SIGUSR1)

    rc, _out, err = _stop_midway(run, cache_dir, ask)
    assert rc != 0  # the launcher reports the workers' exit code 75 as a failure
    assert "exitcode  : 75" in err
    s = summary(run)
    assert s["status"] == "stopped"
    stop_events = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "stop"]
    assert len(stop_events) == 1 and 15 <= stop_events[0]["step"] < 60
    step = stop_events[0]["step"]
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert s["steps"] == step

    proc = check(launch(ARGS + [f"output_dir={run}"], cache_dir, nproc=2))
    assert f"at step {step}" in proc.stdout
    assert summary(run)["status"] == "max_steps" and summary(run)["steps"] == 60
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert comparable_events(run) == comparable_events(whole)


def test_single_process_run_exits_75_when_stopped(tmp_path, cache_dir):
    run = tmp_path / "single"
    proc = subprocess.Popen(launch_command(ARGS + [f"output_dir={run}"], nproc=1), cwd=ROOT, env=run_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75
    assert "stop requested (SIGTERM)" in out
    assert summary(run)["status"] == "stopped"
