"""One host sync per optimizer step (+ one per log line): counted on the CPU by wrapping every call that makes
the host wait for the device on CUDA (reading a value, copying to the host, building a device tensor from
host data). The GPU check confirms it on CUDA with torch.cuda.set_sync_debug_mode."""

from __future__ import annotations

import pytest
import torch
from conftest import build_run, one_step

SYNCING_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


class SyncCounter:
    """Counts the host-sync-capable calls made while active, whoever makes them (alexdist, Accelerate, torch)."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in SYNCING_METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))
        tensor = torch.tensor

        def counted_tensor(*args, **kwargs):
            if kwargs.get("device") is not None and self.active:
                self.calls.append("torch.tensor(..., device=...)")
            return tensor(*args, **kwargs)

        monkeypatch.setattr(torch, "tensor", counted_tensor)
        self.active = False

    def _wrap(self, name, original):
        def wrapper(t, *args, **kwargs):
            if self.active:
                self.calls.append(f"Tensor.{name}")
            return original(t, *args, **kwargs)
        return wrapper


@pytest.fixture
def run(tmp_path, monkeypatch, fresh_accelerate_state):
    return build_run(tmp_path, monkeypatch, [
        "data.source=synthetic", "data.synthetic_train=512", "data.synthetic_test=64", "train.batch_size=16",
        "train.grad_accum=2", "train.grad_clip=1.0", "train.log_every=4"])


def test_an_optimizer_step_syncs_the_host_once_and_a_log_step_once_more(run, monkeypatch):
    batches = run.batches.epoch(0)
    one_step(run, batches)  # the first step: one-time set-up (lazy allocations, the step timeout)
    counter = SyncCounter(monkeypatch)
    counter.active = True
    for _ in range(2):  # steps 2 and 3: no log line
        one_step(run, batches)
    assert counter.calls == ["Tensor.tolist"] * 2, counter.calls  # the stop/NaN agreement, once per step
    counter.calls.clear()
    result = one_step(run, batches)  # step 4 logs: its loss is read once
    result.loss.item()
    counter.active = False
    assert counter.calls == ["Tensor.tolist", "Tensor.item"], counter.calls
    assert run.state.global_step == 4


def test_the_counter_sees_a_sync_where_there_is_one(run, monkeypatch):
    counter = SyncCounter(monkeypatch)
    counter.active = True
    bool(torch.zeros(1) > 0)
    torch.tensor([1.0], device="cpu").item()
    assert counter.calls == ["Tensor.__bool__", "torch.tensor(..., device=...)", "Tensor.item"]
