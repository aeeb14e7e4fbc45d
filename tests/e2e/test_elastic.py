"""TorchElastic (torchrun's elastic agent, the engine of Kubernetes' PyTorchJob and of cloud VM groups), proven
on this CPU with two agents side by side on loopback (two "nodes" of one process each):

    torchrun --nnodes 1:2 --nproc-per-node 1 --max-restarts 3 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:PORT -m alexdist.train ...

- a worker SIGKILLed mid-run: the agents restart the group, the run resumes from its newest complete checkpoint
  and ends bit for bit with the uninterrupted run (DDP). Each agent runs as a Kubernetes PyTorchJob's container
  command does (docs/examples/pytorchjob-elastic.yaml): torchrun as PID 1 of its own PID namespace;
- an agent lost for good: the surviving agent re-forms the group at world size 1 and the run continues through
  the world-size-change paths (DDP's whole checkpoint, ZeRO's universal checkpoint, FSDP2's DCP), the effective
  batch kept by train.global_batch.

Every agent runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torch's default (the rendezvous store shared with
the workers across rounds) a restart hangs forming the new group (docs/clusters.md). `last_call_timeout=3`
shortens the wait for a lost agent (30 s by default) to keep the tests short; the agents start together, so the
first group forms at full size however slowly each imports torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, check, launch, read_jsonl, run_env, summary, unshare_refusal, wait_for_step
from safetensors.torch import load_file

from alexdist.distributed.launcher import free_port
from alexdist.distributed.processes import children_of, kill_tree

# 22 steps per epoch on digits; the effective batch kept on any world size
RUN = ["train.epochs=4", "checkpoint.every_steps=5", "tracking.wandb=false", "eval.confusion_png=false",
       "train.log_every=1", "train.global_batch=64"]


def _agents(out: Path, overrides: list[str], cache_dir: Path, pods: bool = False) -> list[subprocess.Popen]:
    """Two torchrun agents on loopback. `pods`: each as a Kubernetes pod runs it, PID 1 of a PID namespace of its
    own under a hostname of its own (pod0, pod1), at its own loopback address."""
    port = free_port()
    env = run_env(cache_dir, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    agents = []
    for a in range(2):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
                    "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                    # Agent 0 hosts the store (not whichever binds first: the lost-agent tests kill agent 1).
                    "--rdzv-id", f"job-{port}", "--rdzv-conf", f"is_host={a == 0},last_call_timeout=3"]
        if pods:  # a pod's own address, which orders the ranks: pod1 (127.0.0.2) holds rank 0, pod0 the store
            torchrun += ["--local-addr", f"127.0.0.{3 - a}"]
        cmd = [*torchrun, "-m", "alexdist.train", "quickstart", *RUN, *overrides, f"output_dir={out}"]
        if pods:
            cmd = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c",
                   f'hostname pod{a} && exec "$@"', "sh", *cmd]
        with open(out.parent / f"{out.name}.agent{a}.log", "w") as log:  # the agent keeps its own copy of the fd
            agents.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
    return agents


def _first_step_after(run: Path, t_kill: float, timeout: float = 240) -> float:
    """Seconds from the kill to the first optimizer step of the next attempt (its start event, then a step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        events = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        starts = [i for i, e in enumerate(events) if e["event"] == "start"]
        if len(starts) > 1 and any(e["event"] == "step" for e in events[starts[-1]:]):
            return time.time() - t_kill
        time.sleep(0.1)
    raise TimeoutError(f"{run}: no step after the kill in {timeout} s")


def _finish(agents: list[subprocess.Popen], out: Path) -> list[int]:
    try:
        return [a.wait(timeout=600) for a in agents]
    finally:
        for a in agents:
            kill_tree(a.pid)
        logs = [(out.parent / f"{out.name}.agent{i}.log").read_text()[-3000:] for i in range(len(agents))]
        print("\n".join(logs) if not (out / "summary.json").is_file() else "")


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _worker_of(agent: subprocess.Popen) -> int:
    """The training process under an agent (under `unshare`, torchrun sits between them)."""
    for pid in children_of(agent.pid):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"alexdist.train" in cmd and b"torch.distributed.run" not in cmd and cmd[0] != b"sh":
            return pid
    raise AssertionError(f"no worker under agent {agent.pid}")


def test_a_worker_killed_mid_run_is_restarted_and_the_run_ends_with_the_uninterrupted_weights(tmp_path, cache_dir):
    if why := unshare_refusal():
        pytest.skip(f"the agents as PID 1 are not tested: {why}")
    ref, run = tmp_path / "ref", tmp_path / "run"
    check(launch(RUN + [f"output_dir={ref}"], cache_dir, nproc=2))
    agents = _agents(run, [], cache_dir, pods=True)
    wait_for_step(run, 23)  # past the first epoch's evaluation and the checkpoint at step 20
    worker = _worker_of(agents[1])
    t_kill = time.time()
    os.kill(worker, signal.SIGKILL)
    latency = _first_step_after(run, t_kill)
    codes = _finish(agents, run)
    print(f"\nworker SIGKILLed -> first optimizer step of the restarted group: {latency:.1f} s")
    assert codes == [0, 0] and summary(run)["world_size"] == 2 and summary(run)["steps"] == 88
    assert _same_weights(ref, run)  # DDP: bit for bit, BatchNorm statistics included
    reformed = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "reformed"]
    assert len(reformed) == 1 and reformed[0]["restart_count"] >= 1 and reformed[0]["world_size"] == 2


@pytest.mark.parametrize("strategy", [[], ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"],
                                      ["distributed.strategy=fsdp"]], ids=["ddp", "zero2", "fsdp"])
@pytest.mark.learned
def test_an_agent_lost_for_good_leaves_a_group_of_one_that_finishes_the_run(strategy, tmp_path, cache_dir):
    """The pod that holds rank 0 is lost: rank 0 moves to the other pod, whose new rank 0 takes the run directory
    over at once (the same TorchElastic job), instead of finding it held by a fresh lock from another host."""
    pods = unshare_refusal() is None
    run = tmp_path / "run"
    agents = _agents(run, strategy, cache_dir, pods=pods)
    wait_for_step(run, 23)
    holder = json.loads((run / ".lock").read_text())
    if pods:
        assert holder["host"] == "pod1" and holder["elastic_run"]  # rank 0 sits on the pod about to be lost
    t_kill = time.time()
    kill_tree(agents[1].pid)  # the agent and its worker: a node gone
    latency = _first_step_after(run, t_kill)
    codes = _finish(agents[:1], run)
    print(f"\nagent lost ({'/'.join(strategy) or 'ddp'}) -> first step at world size 1: {latency:.1f} s")
    s = summary(run)
    assert codes == [0] and s["status"] == "finished" and s["steps"] == 88
    assert s["world_size"] == 1 and s["effective_batch"] == 64 and s["batch_size_per_process"] == 64
    reformed = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "reformed"]
    assert [(e["previous_world_size"], e["world_size"]) for e in reformed] == [(2, 1)]
    assert s["final_test_acc"] > 0.8  # it kept learning: digits, 4 epochs
    log = (run.parent / f"{run.name}.agent0.log").read_text()
    assert "in use by another run" not in log and codes == [0]  # no restart spent on the lock
    starts = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "start"]
    assert json.dumps(starts[-1]["resumed_from"]).count("step-") == 1
