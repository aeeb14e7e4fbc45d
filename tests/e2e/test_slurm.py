"""`sbatch slurm/train.sh` against a real Slurm cluster (one node, CPU only: 2 processes per node).

Needs a running cluster: `bash slurm/local/start_local_slurm.sh start [--nodes 2]` (CI starts two nodes and sets
ALEXDIST_REQUIRE_SLURM=2, which turns a missing cluster into a failure instead of a skip). These jobs take one
node; tests/e2e/test_slurm_two_nodes.py runs the two-node ones.
"""

import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import check, comparable_events, launch, read_jsonl, summary, wait_for_step
from safetensors.torch import load_file
from slurm_jobs import job_info, leftover, require_slurm, wait_finished
from slurm_jobs import sbatch as _sbatch

from alexdist.distributed.processes import LAUNCHER_DEATH_SIGNAL_NAME

pytestmark = pytest.mark.slurm

ARGS = ["recipes/quickstart.yaml", "tracking.wandb=false", "train.log_every=2"]


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    require_slurm(1)


def sbatch(run: Path, cache_dir, extra=(), wait=False) -> tuple[str, subprocess.CompletedProcess]:
    return _sbatch(run, cache_dir, [*ARGS, *extra], wait=wait)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("slurm") / "whole"
    job, proc = sbatch(run, cache_dir, wait=True)
    assert proc.returncode == 0, Path(f"{run}.slurm.log").read_text()[-3000:]
    return job, run


@pytest.mark.learned
def test_sbatch_trains_the_quickstart_on_two_cpu_processes(uninterrupted):
    job, run = uninterrupted
    s = summary(run)
    assert s["status"] == "finished" and s["world_size"] == 2 and s["distributed_type"] == "DistributedType.MULTI_CPU"
    assert s["final_test_acc"] >= 0.90
    assert len([e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"]) == 12
    log = Path(f"{run}.slurm.log").read_text()
    assert f"job {job} restart 0 | 1 node(s) x 2 process(es)" in log
    assert job_info(job)["JobState"] == "COMPLETED"


def test_usr1_checkpoints_requeues_and_finishes_like_the_uninterrupted_run(uninterrupted, tmp_path, cache_dir):
    _, whole = uninterrupted
    run = tmp_path / "preempted"
    t0 = time.time()
    job, proc = sbatch(run, cache_dir)
    assert proc.returncode == 0, proc.stderr
    wait_for_step(run, 40)
    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = wait_finished(job)
    wall = time.time() - t0
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    log = Path(f"{run}.slurm.log").read_text()  # --open-mode=append: both attempts in one log
    assert f"job {job} restart 0" in log and f"job {job} restart 1" in log and "requeueing job" in log
    stop = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "stop"]
    assert len(stop) == 1 and stop[0]["reason"] in ("STOP file", "another rank was asked")
    assert summary(run)["status"] == "finished"
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same parameters as the uninterrupted job
    assert comparable_events(run) == comparable_events(whole)  # and the same per-step and per-epoch metrics
    print(f"\npreempt -> requeue -> finish: {wall:.0f} s wall (signal at {t_signal - t0:.0f} s, stop at step "
          f"{stop[0]['step']})")


def test_plain_scancel_leaves_a_resumable_checkpoint_and_no_processes(tmp_path, cache_dir):
    run = tmp_path / "cancelled"
    job, proc = sbatch(run, cache_dir)
    assert proc.returncode == 0, proc.stderr
    wait_for_step(run, 30)
    subprocess.run(["scancel", job], check=True)
    info = wait_finished(job, timeout=120)
    assert info["JobState"] == "CANCELLED"
    left = leftover(f"output_dir={run}")
    assert left == [], f"orphaned processes: {left}"
    stop = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "stop"]
    # scancel signals every process: SIGTERM, or the launcher's death if it went first.
    assert len(stop) == 1 and stop[0]["reason"] in ("SIGTERM", "another rank was asked",
                                                     f"the launcher died ({LAUNCHER_DEATH_SIGNAL_NAME})")
    step = stop[0]["step"]
    assert (run / "checkpoints" / f"step-{step:07d}" / "trainer_state.json").is_file()
    # Resumable: a later run (here a direct 2-process launch) continues from that checkpoint.
    proc = check(launch(ARGS[1:] + [f"output_dir={run}", f"train.max_steps={step + 2}"], cache_dir, nproc=2))
    assert f"at step {step}" in proc.stdout and summary(run)["steps"] == step + 2
