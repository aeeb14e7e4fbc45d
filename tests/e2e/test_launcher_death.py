"""The launcher dies (SIGKILL: an OOM kill, a closed session, a crashed agent) and its workers must not live on:
during setup they exit within seconds; during training they checkpoint at the next step and exit, and the
relaunch resumes at once and ends with the uninterrupted run's weights. DDP, ZeRO-2 and FSDP2 on 2 CPU ranks,
started as a user would: `accelerate launch --multi_gpu --num_processes 2`.

And the cases around it (processes.die_with_launcher): a launcher that is PID 1 (a container) is not taken for
a dead one; a subreaper (systemd, slurmstepd) that adopts the orphans does not hide the death; a launcher that
died before its workers asked the kernel to tell them is caught at start; and the death is named from the
signal itself, even while getppid() still names the launcher (its forking thread gone first)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from helpers import ROOT, check, launch, launch_command, read_jsonl, run_env, summary, unshare_refusal, wait_for_step
from safetensors.torch import load_file

from alexdist.distributed.processes import LAUNCHER_DEATH_SIGNAL, LAUNCHER_DEATH_SIGNAL_NAME, children_of

RUN = ["train.epochs=2", "checkpoint.every_steps=5", "tracking.wandb=false", "train.log_every=1"]
DIED = f"the launcher died ({LAUNCHER_DEATH_SIGNAL_NAME})"  # its own signal: never a hang-up's or a plain stop's
STRATEGIES = {"ddp": [], "zero2": ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"],
              "fsdp": ["distributed.strategy=fsdp"]}


HARNESS = ROOT / "tests" / "workers" / "launcher_harness.py"
SHORT = ["train.max_steps=400", "checkpoint.every_steps=0", "tracking.wandb=false", "train.log_every=1"]


def _harness(flags: list[str], cmd: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, str(HARNESS), *flags, "--", *cmd], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in report, report
    return report


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
    assert len(stop) == 1 and stop[0]["reason"] == DIED
    check(launch(RUN + extra + [f"output_dir={run}"], cache_dir, nproc=2))  # the lock is free: resumes at once
    assert summary(run)["resumed_at_step"] == stop[0]["step"]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm statistics included


@pytest.mark.parametrize("name", STRATEGIES)
def test_killing_the_launcher_in_setup_ends_the_workers_within_seconds(name, tmp_path, cache_dir):
    run = tmp_path / "run"
    # Rank 0 decodes the data 60 s slower: rank 1 waits for it in a collective (an orphan would sit there for
    # distributed.setup_timeout_s, 30 minutes). The launcher is killed 5 s after both workers exist.
    env = run_env(cache_dir, ALEXDIST_FAULT="slow_setup:60")
    report = _harness(["--run-dir", str(run), "--kill-after-s", "5"],
                      launch_command(RUN + STRATEGIES[name] + [f"output_dir={run}"], 2), env)
    print(f"\n{name}: launcher killed in setup -> workers gone in {report['gone_s']:.2f} s")
    assert len(report["workers"]) == 2 and not report["left"] and report["gone_s"] < 10
    check(launch(RUN + STRATEGIES[name] + ["train.max_steps=2", f"output_dir={run}"], cache_dir, nproc=2))


# -- the orphan check in every case -------------------------------------------------------------------------

def test_a_launcher_that_is_pid_1_runs_the_quickstart_to_its_end(tmp_path, cache_dir):
    """Docker's entrypoint, a PyTorchJob's torchrun: the launcher is PID 1 of its namespace, and its workers'
    parent is PID 1 from the start; the workers used to take that for an orphan and SIGTERM themselves."""
    if why := unshare_refusal():
        pytest.skip(f"the launcher as PID 1 is not tested: {why}")
    run = tmp_path / "run"
    cmd = ["unshare", "--pid", "--fork", "--mount-proc",
           *launch_command(["train.max_steps=4", "tracking.wandb=false", f"output_dir={run}"], 2)]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(cache_dir), capture_output=True, text=True, timeout=300,
                          check=False)
    check(proc)
    assert summary(run)["status"] == "max_steps" and summary(run)["steps"] == 4


@pytest.mark.parametrize("subreaper", [False, True], ids=["init-adopts", "subreaper-adopts"])
def test_a_sigkilled_launcher_leaves_no_worker_whoever_adopts_them(subreaper, tmp_path, cache_dir):
    run = tmp_path / "run"
    flags = ["--run-dir", str(run), "--kill-at-step", "3"] + (["--subreaper"] if subreaper else [])
    report = _harness(flags, launch_command(SHORT + [f"output_dir={run}"], 2), run_env(cache_dir))
    print(f"\nsubreaper={subreaper}: {report}")
    assert len(report["workers"]) == 2 and not report["left"] and report["gone_s"] < 10
    if subreaper:  # the orphans were the harness's to reap: both checkpointed and stopped (exit 75)
        assert report["adopted_by"] == [report["harness"]] and report["exit_codes"] == [75, 75]
    stop = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "stop"]
    assert len(stop) == 1 and stop[0]["reason"] == DIED


@pytest.mark.parametrize("subreaper", [False, True], ids=["init-adopts", "subreaper-adopts"])
def test_a_launcher_gone_before_its_workers_ask_to_die_with_it_leaves_no_worker(subreaper, tmp_path, cache_dir):
    """The workers read their launcher's pid, then (slow_start) pause 8 s before asking the kernel to signal
    them; the launcher is killed in that pause. No request can cover a death before it: the parent they find
    afterwards is not the one they started with, whoever adopted them, and they leave at once."""
    run = tmp_path / "run"
    env = run_env(cache_dir, ALEXDIST_FAULT="slow_start:8:*")
    flags = ["--run-dir", str(run), "--kill-after-s", "2"] + (["--subreaper"] if subreaper else [])
    report = _harness(flags, launch_command(SHORT + [f"output_dir={run}"], 2), env)
    print(f"\nsubreaper={subreaper}, killed in the pause: {report}")
    assert len(report["workers"]) == 2 and not report["left"] and report["gone_s"] < 6 + 10
    assert not (run / "metrics.jsonl").exists()  # gone before any training
    if subreaper:  # ended by the launcher-death signal itself, not by failing to reach the dead launcher's store
        assert report["exit_codes"] == [-LAUNCHER_DEATH_SIGNAL, -LAUNCHER_DEATH_SIGNAL]


def test_the_launcher_death_is_named_from_the_signal_while_getppid_still_names_the_launcher(tmp_path, cache_dir):
    """The kernel signals a worker when the *thread* that forked it exits. A SIGKILLed launcher's other threads
    can outlive that thread for a moment, so the worker is signalled while it is handed to a sibling thread of
    the same pid: getppid() has not changed. Here the forking thread ends at step 3 and the launcher lives on
    (the race, held open); the stop must still say the launcher died."""
    run = tmp_path / "run"
    worker = [sys.executable, "-m", "alexdist.train", "recipes/quickstart.yaml", *SHORT, f"output_dir={run}"]
    report = _harness(["--thread-forks", "--run-dir", str(run), "--kill-at-step", "3"], worker, run_env(cache_dir))
    print(f"\nforking thread gone: {report}")
    assert report["reached"] and report["exit_code"] == 75 and report["gone_s"] < 10
    stop = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "stop"]
    assert len(stop) == 1 and stop[0]["reason"] == DIED
