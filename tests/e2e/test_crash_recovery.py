"""Crash at any point: a rank SIGKILLed during training, evaluation or anywhere inside a checkpoint save.

Each scenario is one run that is killed again and again (ALEXDIST_FAULT, see alexdist/faults.py), relaunched
each time with `checkpoint.resume=auto`, and finally allowed to finish. Every relaunch must resume from the
newest checkpoint that was complete when the rank died (never a half-written one), and the finished run must
end with the parameters and the metrics of a run that was never interrupted.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from helpers import check, comparable_events, launch, read_jsonl, run_env
from safetensors.torch import load_file

# 8 steps per epoch, 3 epochs (evaluations at steps 8, 16, 24); a checkpoint every 2 steps, one kept (+ best),
# so every save also rotates an older checkpoint away. No confusion.png: nothing here reads it, and drawing it
# imports matplotlib in every launch that evaluates.
RUN = ["data.source=synthetic", "data.synthetic_train=512", "data.synthetic_test=128", "train.epochs=3",
       "train.batch_size=32", "checkpoint.every_steps=2", "checkpoint.keep=1", "tracking.wandb=false",
       "train.log_every=1", "model.width_mult=0.25", "eval.confusion_png=false"]

# (fault, newest complete checkpoint when it fires). Steps only grow: each relaunch reaches the next fault.
DDP_FAULTS = [
    ("train:3:1", 2),  # rank 1 dies right after a step
    ("save.begin:4:0", 2),  # checkpoint directory made, nothing in it
    ("save.weights:4:0", 2),  # weight shards written, optimizer state not
    ("save.state:4:1", 2),  # rank 1 done writing, rank 0 maybe not
    ("save.before_rename:4:0", 2),  # everything written and synced, not renamed
    ("save.after_rename:4:0", 4),  # complete, the older one not yet rotated away
    ("save.rotate:6:0", 6),  # an older checkpoint half way to deletion
    ("eval:8:1", 6),  # during the epoch-end evaluation
    ("save.state:10:0", 8),
    ("train:11:0", 10),  # rank 0 dies
    ("save.begin:16:1", 14),  # the epoch-end save
    ("save.after_rename:18:0", 18),
    ("save.before_rename:20:1", 20),  # rank 1 dies after every rank reported its files written: complete
]
ZERO2_FAULTS = [
    ("train:3:0", 2),
    ("save.begin:4:1", 2),
    ("save.state:4:1", 2),  # rank 1's ZeRO partition written
    ("save.state:4:0", 2),
    ("save.before_rename:4:0", 2),
    ("save.after_rename:4:0", 4),
    ("save.rotate:6:0", 6),
    ("eval:8:0", 6),
    ("train:13:1", 12),
]
FSDP_FAULTS = [
    ("save.weights:4:1", 2),  # rank 1's DCP shards written, rank 0's maybe not, nothing else
    ("save.state:4:0", 2),
    ("save.before_rename:4:1", 4),  # after every rank reported its files written: complete
    ("save.after_rename:6:0", 6),
    ("eval:8:1", 6),
    ("train:11:0", 10),
]
HANG_BOUND_S = 30  # a dead rank must take the whole job down within this (measured: ~1.5 s)


def _checkpoint_files(ckpt: Path) -> set[str]:
    return {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}


def _complete(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


def _launch(overrides, cache_dir, config_file, fault=None):
    env = run_env(cache_dir, **({"ALEXDIST_FAULT": fault} if fault else {}))
    proc = launch(overrides, cache_dir, nproc=2, env=env, config_file=config_file)
    return proc, time.time()


def _run_with_faults(tmp_path, cache_dir, faults, extra, config_file=None):
    ref, run = tmp_path / "uninterrupted", tmp_path / "faulted"
    check(_launch(RUN + extra + [f"output_dir={ref}"], cache_dir, config_file)[0])
    ref_files = _checkpoint_files(_complete(ref)[-1])
    bounds, resumed_from = [], 0
    for fault, newest in faults:
        proc, ended = _launch(RUN + extra + [f"output_dir={run}"], cache_dir, config_file, fault)
        point, step, rank = fault.split(":")
        record_file = run / f"fault-{rank}.json"
        assert proc.returncode not in (0, 75) and record_file.is_file(), (fault, proc.stderr[-3000:])
        record = json.loads(record_file.read_text())
        record_file.unlink()
        assert (record["point"], record["step"]) == (point, int(step))
        bounds.append(ended - record["time"])  # kill -> launcher gone, every rank included
        # Only whole checkpoints carry a step-* name, whatever the moment of death.
        complete = _complete(run)
        assert complete and int(complete[-1].name.split("-")[1]) == newest, (fault, complete)
        for ckpt in complete:
            assert _checkpoint_files(ckpt) == ref_files, (fault, ckpt)
        start = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "start"][-1]
        assert start["resumed_at_step"] == resumed_from, fault  # this attempt began at the previous newest
        resumed_from = newest
    check(_launch(RUN + extra + [f"output_dir={run}"], cache_dir, config_file)[0])
    start = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "start"][-1]
    assert start["resumed_at_step"] == faults[-1][1]
    print(f"\n{len(faults)} kills; dead rank -> job gone in {min(bounds):.2f}-{max(bounds):.2f} s")
    assert max(bounds) < HANG_BOUND_S
    return load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors")), ref, run


def test_ddp_run_killed_at_13_points_finishes_with_the_uninterrupted_weights_and_statistics(tmp_path, cache_dir):
    want, got, ref, run = _run_with_faults(tmp_path, cache_dir, DDP_FAULTS, [])
    assert any(k.endswith("running_var") for k in want)  # BatchNorm statistics compared too
    for k in want:
        assert torch.equal(want[k], got[k]), k  # DDP resume is exact: bit-identical weights
    assert comparable_events(run) == comparable_events(ref)


def test_zero2_run_killed_at_9_points_finishes_with_the_uninterrupted_weights_and_statistics(tmp_path, cache_dir):
    # The BatchNorm model: ZeRO partitions no buffers, and rank 0's statistics are broadcast before every forward
    # (as DDP does), so the statistics resume bit for bit with everything ZeRO partitions.
    want, got, ref, run = _run_with_faults(tmp_path, cache_dir, ZERO2_FAULTS, [],
                                           config_file="recipes/accelerate/zero2.yaml")
    assert any(k.endswith("running_var") for k in want)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert comparable_events(run) == comparable_events(ref)


def test_fsdp_run_killed_at_6_points_finishes_with_the_uninterrupted_weights_and_statistics(tmp_path, cache_dir):
    # BatchNorm included: rank 0's statistics are broadcast before each save and evaluation; DCP resumes them.
    want, got, ref, run = _run_with_faults(tmp_path, cache_dir, FSDP_FAULTS, ["distributed.strategy=fsdp"])
    assert want.keys() == got.keys() and any(k.endswith("running_var") for k in want)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert comparable_events(run) == comparable_events(ref)


def test_a_slow_setup_is_allowed_for_and_a_hang_after_it_is_not(tmp_path, cache_dir):
    """distributed.setup_timeout_s covers a slow start (rank 0 decoding a dataset while the others wait);
    from the first step on the shorter distributed.step_timeout_s applies."""
    slow = run_env(cache_dir, ALEXDIST_FAULT="slow_setup:15:0")
    run = tmp_path / "slow"
    check(launch(RUN + ["train.max_steps=3", "distributed.step_timeout_s=10", "distributed.setup_timeout_s=60",
                        f"output_dir={run}"], cache_dir, nproc=2, env=slow))
    proc, _ = _launch(RUN + ["train.max_steps=3", "distributed.step_timeout_s=10", "distributed.setup_timeout_s=10",
                             f"output_dir={tmp_path / 'too-slow'}"], cache_dir, None, "slow_setup:15:0")
    assert proc.returncode != 0 and "lost contact with the other processes" in proc.stderr, proc.stderr[-3000:]


def test_a_hung_rank_ends_the_job_within_the_collective_timeout(tmp_path, cache_dir):
    """A rank that stops responding without dying: the others' next collective times out after
    distributed.step_timeout_s, rank 0 says so, and the launcher then kills the hung rank (its SIGTERM grace is
    30 s)."""
    run = tmp_path / "hang"
    proc, ended = _launch(RUN + [f"output_dir={run}", "distributed.step_timeout_s=10"], cache_dir, None, "hang:3:1")
    hung = json.loads((run / "fault-1.json").read_text())["time"]
    assert proc.returncode != 0
    # Where rank 0 waits decides gloo's wording ("Timed out waiting ...", "Application timeout caused pair closure").
    assert re.search(r"rank 0 lost contact with the other processes \(.*[Tt]ime", proc.stderr), proc.stderr[-6000:]
    print(f"\nhung rank -> job gone in {ended - hung:.1f} s (timeout_s=10)")
    assert 10 <= ended - hung < 10 + 30 + 20
