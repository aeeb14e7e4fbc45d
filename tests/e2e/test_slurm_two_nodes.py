"""Several nodes, proven on one machine: a two-node Slurm cluster (slurm/local/start_local_slurm.sh --nodes 2:
one slurmd per node, each in its own UTS namespace with its own loopback address), 1 process per node.

The data is scikit-learn's digits as PNG files in ImageNet's folder layout, on the file system both nodes share
(its index in the shared data.cache_dir). `sbatch --nodes=2 slurm/train.sh` streams it from disk (data.loader=
stream: each node's rank reads its own samples) and equals the one-node 2-process run, which holds it in memory,
bit for bit. In memory, a two-node job survives USR1 preemption and `scancel`, ends soon after a node is lost and
continues when resubmitted, each ending with the one-node run's weights; `accelerate launch --num_machines 2`
started by hand in the two nodes' namespaces trains too; ZeRO-2 trains and resumes on two nodes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from dataset_files import digits_folder
from helpers import ROOT, check, comparable_events, launch, read_jsonl, summary, wait_for_step
from safetensors.torch import load_file
from slurm_jobs import job_info, leftover, require_slurm, sbatch, slurm_env, wait_finished

from alexdist.distributed.launcher import free_port

pytestmark = pytest.mark.slurm

# 80 optimizer steps of the quickstart (3.6 epochs): epoch ends, evaluations and checkpoints included. Both data
# paths normalize with the same constants (the streamed one would otherwise measure its own).
QUICKSTART = ["tracking.wandb=false", "train.log_every=2", "data.loader=memory", "data.mean=[0.2,0.2,0.2]",
              "data.std=[0.3,0.3,0.3]", "train.max_steps=80"]
TWO_NODES = ("--nodes=2",)
LOST_NODE_BOUND_S = 30  # measured: see the test's printout


@pytest.fixture(scope="module", autouse=True)
def two_node_cluster():
    require_slurm(2)


@pytest.fixture(scope="module")
def args(tmp_path_factory) -> list[str]:
    """The recipe and overrides of every run here (train.max_steps last): the quickstart's digits read from an
    image folder that both nodes see (this machine's disk)."""
    return ["quickstart", f"data.source={digits_folder(tmp_path_factory.mktemp('digits-folder'))}", *QUICKSTART]


def _env(cache_dir):
    return slurm_env(cache_dir, ALEXDIST_PROCS_PER_NODE="1")  # OMP_NUM_THREADS=1, as the one-node reference


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, cache_dir, args):
    """The reference: the same training as 2 processes on one machine, no Slurm, its data in memory."""
    run = tmp_path_factory.mktemp("one-node") / "run"
    check(launch(args[1:] + [f"output_dir={run}"], cache_dir, nproc=2, recipe="quickstart"))
    return run


@pytest.fixture(scope="module")
def two_node_job(tmp_path_factory, cache_dir, args):
    """The same training streamed from disk: rank 0 indexes the folder into the shared cache, each node's rank
    reads and decodes its own samples."""
    run = tmp_path_factory.mktemp("two-node") / "whole"
    job, proc = sbatch(run, cache_dir, [*args, "data.loader=stream"], TWO_NODES, wait=True, env=_env(cache_dir))
    assert proc.returncode == 0, Path(f"{run}.slurm.log").read_text()[-4000:]
    return job, run


def test_a_two_node_job_streams_its_data_and_equals_the_one_node_in_memory_run_bit_for_bit(two_node_job, one_node):
    job, run = two_node_job
    s = summary(run)
    assert s["world_size"] == 2 and s["distributed_type"] == "DistributedType.MULTI_CPU" and s["steps"] == 80
    assert s["data_loader"] == "stream" and summary(one_node)["data_loader"] == "memory"
    assert s["rank_param_sums"][0] == s["rank_param_sums"][1]
    assert s["rank_buffer_sums"][0] == s["rank_buffer_sums"][1]
    assert _same_weights(run, one_node)
    assert comparable_events(run) == comparable_events(one_node)
    log = Path(f"{run}.slurm.log").read_text()
    assert f"job {job} restart 0 | 2 node(s) x 1 process(es)" in log
    assert job_info(job)["JobState"] == "COMPLETED" and job_info(job)["NodeList"] == "node[1-2]"
    # One line per event for the whole job, not one per node.
    assert log.count("alexdist: done at step 80") == 1 and log.count("epoch   1 step") == 1


def test_usr1_stops_both_nodes_at_one_step_requeues_and_ends_bit_identical(one_node, tmp_path, cache_dir, args):
    run = tmp_path / "preempted"
    t0 = time.time()
    job, proc = sbatch(run, cache_dir, args, TWO_NODES, env=_env(cache_dir))
    assert proc.returncode == 0, proc.stderr
    wait_for_step(run, 30)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = wait_finished(job)
    wall = time.time() - t0
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    stop = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "stop"]
    assert len(stop) == 1  # rank 0 logs the step every rank stopped at (the all-reduce makes it one step)
    log = Path(f"{run}.slurm.log").read_text()  # both attempts, appended
    assert f"step-{stop[0]['step']:07d} at step {stop[0]['step']}" in log and "requeueing job" in log
    assert summary(run)["status"] == "max_steps"
    assert _same_weights(run, one_node) and comparable_events(run) == comparable_events(one_node)
    print(f"\ntwo nodes: USR1 at step {stop[0]['step']} -> checkpoint, requeue, resume, finish: {wall:.0f} s wall")


def _workers(node: str) -> list[psutil.Process]:
    """The training processes (not the launchers) running on one of the local cluster's nodes."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd, env = " ".join(p.info["cmdline"] or []), p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "alexdist.train" in cmd and "accelerate" not in cmd and env.get("SLURMD_NODENAME") == node:
            found.append(p)
    return found


def test_scancel_leaves_a_resumable_checkpoint_and_no_process_on_either_node(tmp_path, cache_dir, args):
    run = tmp_path / "cancelled"
    job, proc = sbatch(run, cache_dir, args, TWO_NODES, env=_env(cache_dir))
    assert proc.returncode == 0, proc.stderr
    wait_for_step(run, 20)
    subprocess.run(["scancel", job], check=True)
    assert wait_finished(job, timeout=120)["JobState"] == "CANCELLED"
    left = leftover(f"output_dir={run}")
    assert left == [], f"orphaned processes: {left}"
    assert _workers("node1") == [] and _workers("node2") == []
    stop = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "stop"]
    assert len(stop) == 1 and (run / "checkpoints" / f"step-{stop[0]['step']:07d}" / "trainer_state.json").is_file()


def test_a_lost_node_ends_the_job_quickly_and_a_resubmission_continues(one_node, tmp_path, cache_dir, args):
    run = tmp_path / "lost-node"
    args = [*args, "checkpoint.every_steps=10"]
    job, proc = sbatch(run, cache_dir, args, TWO_NODES, env=_env(cache_dir))
    assert proc.returncode == 0, proc.stderr
    wait_for_step(run, 35)
    victims = _workers("node2")
    assert victims, "no training process found on node2"
    killed = time.time()
    for p in victims:
        p.send_signal(signal.SIGKILL)
    info = wait_finished(job, timeout=300)
    gone = time.time() - killed
    assert info["JobState"] in ("FAILED", "CANCELLED"), info
    assert gone < LOST_NODE_BOUND_S, f"the job took {gone:.1f} s to end after node2 was lost"
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert (newest / "trainer_state.json").is_file() and (newest / "manifest.json").is_file()
    print(f"\nnode2's processes SIGKILLed -> job ended {gone:.1f} s later; newest checkpoint {newest.name}")
    # The same command again: it continues from that checkpoint, and ends as if nothing had happened.
    _, proc = sbatch(run, cache_dir, args, TWO_NODES, wait=True, env=_env(cache_dir))
    assert proc.returncode == 0, Path(f"{run}.slurm.log").read_text()[-4000:]
    start = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "start"][-1]
    assert start["resumed_at_step"] == int(newest.name.split("-")[1])
    assert _same_weights(run, one_node)


def test_accelerate_launch_by_hand_on_two_nodes_without_slurm(one_node, tmp_path, cache_dir, args):
    """The README's multi-node command, each node's half started in that node's namespace."""
    run, port = tmp_path / "by-hand", free_port()
    env = slurm_env(cache_dir)
    procs = []
    for rank in (0, 1):
        launch = (f"exec {sys.executable} -m accelerate.commands.launch --multi_gpu --num_machines 2 "
                  f"--machine_rank {rank} --main_process_ip node1 --main_process_port {port} --num_processes 2 "
                  f"--mixed_precision no --dynamo_backend no -m alexdist.train {' '.join(args)} output_dir={run}")
        procs.append(subprocess.Popen(["unshare", "--uts", "sh", "-c", f"hostname node{rank + 1} && {launch}"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert summary(run)["world_size"] == 2 and _same_weights(run, one_node)


def test_zero2_trains_and_resumes_on_two_nodes(tmp_path, cache_dir, args):
    zero2 = ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"]
    ref, run = tmp_path / "zero2-one-node", tmp_path / "zero2-two-nodes"
    check(launch([*args[1:-1], "train.max_steps=40", *zero2, f"output_dir={ref}"], cache_dir, nproc=2,
                 recipe="quickstart"))
    for steps in (20, 40):
        _, proc = sbatch(run, cache_dir, [*args[:-1], f"train.max_steps={steps}", *zero2], TWO_NODES, wait=True,
                         env=_env(cache_dir))
        assert proc.returncode == 0, Path(f"{run}.slurm.log").read_text()[-4000:]
    s = summary(run)
    assert s["strategy"] == "deepspeed" and s["world_size"] == 2 and s["resumed_at_step"] == 20
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith("running_var") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # ZeRO's partitions and the BN statistics, on any nodes
