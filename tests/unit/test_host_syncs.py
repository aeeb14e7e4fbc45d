"""One host sync per optimizer step (+ one per logged step), counted on the CPU by wrapping every call that makes
the host wait for the device on CUDA (benchmarks/host_syncs.py). The GPU check counts the same on CUDA with
torch.cuda.set_sync_debug_mode, per strategy. What each strategy and precision adds is in docs/performance.md."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import ROOT, build_run, one_step

sys.path.insert(0, str(ROOT / "benchmarks"))
from host_syncs import SyncCounter

from alexdist.tracking.progress import Progress
from alexdist.training.epoch_end import evaluate_epoch
from alexdist.training.loop import log_step


@pytest.fixture
def run(tmp_path, monkeypatch, fresh_accelerate_state):
    return build_run(tmp_path, monkeypatch, [
        "data.source=synthetic", "data.synthetic_train=512", "data.synthetic_test=64", "train.batch_size=16",
        "train.grad_accum=2", "train.grad_clip=1.0", "train.log_every=4", "train.eval_batch_size=16"])


def test_an_optimizer_step_syncs_the_host_once_and_a_logged_step_once_more(run, monkeypatch):
    batches = run.batches.epoch(0)
    progress = Progress(True, run.total_steps, run.batches.effective_batch, 0)
    log_step(run, one_step(run, batches), 0, progress)  # step 1: one-time set-up (allocations, step timeout)
    counter = SyncCounter(monkeypatch.setattr)
    counter.active = True
    for _ in range(2):  # steps 2 and 3: the loop's own step, bookkeeping and logging, no log line
        log_step(run, one_step(run, batches), 0, progress)
    assert counter.calls == ["Tensor.tolist"] * 2, counter.calls  # the stop/NaN agreement, once per step
    counter.calls.clear()
    log_step(run, one_step(run, batches), 0, progress)  # step 4 logs: the log line reads its loss
    counter.active = False
    assert counter.calls == ["Tensor.tolist", "Tensor.item"], counter.calls
    assert run.state.global_step == 4


def test_an_evaluation_syncs_once_not_once_per_batch(run, monkeypatch):
    counter = SyncCounter(monkeypatch.setattr)
    counter.active = True
    ev = evaluate_epoch(run).test  # 64 test images in 4 batches of 16
    counter.active = False
    assert counter.calls == ["Tensor.tolist"], counter.calls  # the summed loss/accuracy/confusion, read once
    assert sum(map(sum, ev.confusion)) == 64


def test_the_counter_sees_a_sync_where_there_is_one(monkeypatch):
    counter = SyncCounter(monkeypatch.setattr)
    counter.active = True
    bool(torch.zeros(1) > 0)
    torch.tensor([1.0], device="cpu").item()
    torch.bincount(torch.tensor([1, 2])).tolist()
    assert counter.calls == ["Tensor.__bool__", "torch.tensor(..., device=...)", "Tensor.item", "Tensor.tolist"]


def test_a_checkpoints_finite_check_syncs_once_for_all_tensors(monkeypatch):
    from alexdist.checkpoint.checkpointer import all_finite

    tensors = [torch.ones(3), torch.zeros(2, 2), torch.arange(4), torch.full((2,), float("nan"))]
    counter = SyncCounter(monkeypatch.setattr)
    counter.active = True
    assert not all_finite(tensors) and all_finite(tensors[:3])
    counter.active = False
    assert counter.calls == ["Tensor.__bool__", "Tensor.__bool__"]  # one per call, not one per tensor
