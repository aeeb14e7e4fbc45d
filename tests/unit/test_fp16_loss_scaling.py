"""fp16 with a GradScaler and the default fused optimizer: an overflowing step is skipped on the scaler's terms,
and alexdist sees it (the schedule does not advance, the guard counts it). With a fused optimizer the scaler
hands every step to the kernel, which skips internally, so Accelerate's `step_was_skipped` says "not skipped"
(accelerate #4242); alexdist checks the unscaled gradients itself.

Accelerate runs fp16 only on accelerators; on a CPU it would train fp32 without a word. Here the run is built in
this process with Accelerate's own fp16 machinery switched on for the CPU (its GradScaler and fp16 autocast, as
Accelerate sets them up on a GPU): the same code path as on CUDA, down to the fused kernel's found_inf.
"""

from __future__ import annotations

import pytest
import torch
from helpers import build_run, one_step


def _fp16_accelerator_on_cpu(recipe, strategy, log_with=None):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, mixed_precision="fp16", gradient_accumulation_steps=recipe.train.grad_accum,
                      step_scheduler_with_optimizer=False, project_dir=recipe.output_dir)
    acc.native_amp = True  # what Accelerate sets on a GPU; fp16 autocast exists on the CPU too
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # so large that the first steps overflow
    return acc


@pytest.fixture
def run(tmp_path, monkeypatch, fresh_accelerate_state):
    monkeypatch.setattr("alexdist.training.build_run.make_accelerator", _fp16_accelerator_on_cpu)
    return build_run(tmp_path, monkeypatch, [
        "model.name=alexnet_3x3", "data.source=synthetic", "data.synthetic_train=256", "data.synthetic_test=32",
        "train.batch_size=16", "precision=fp16", "train.max_bad_steps=5"])


@pytest.mark.parametrize("clip", [None, 1.0])
def test_an_overflowing_fp16_step_is_skipped_seen_and_does_not_advance_the_schedule(run, clip):
    run.recipe.train.grad_clip = clip  # clipping unscales the gradients first; without it the guard does
    assert run.optimizer.optimizer.defaults["fused"]  # the default kernel: the case Accelerate misreports
    batches = run.batches.epoch(0)
    before = [p.detach().clone() for p in run.model.parameters()]
    lr_before, scale_before = run.scheduler.get_last_lr()[0], run.accelerator.scaler.get_scale()

    result = one_step(run, batches)
    assert result.bad and run.guard.in_row == 1
    assert all(torch.equal(a, p) for a, p in zip(before, run.model.parameters(), strict=True))  # skipped
    # The fused kernel skipped the very first step: momentum starts at zero, not from never-written memory.
    inner = run.optimizer.optimizer
    assert all(not inner.state[p]["momentum_buffer"].any() for p in run.model.parameters())
    assert run.scheduler.get_last_lr()[0] == lr_before and run.scheduler.scheduler.last_epoch == 0  # not advanced
    assert run.accelerator.scaler.get_scale() == scale_before / 2  # the scaler saw the overflow

    run.accelerator.scaler.update(new_scale=2.0**8)  # a scale that fits fp16
    result = one_step(run, batches)
    assert not result.bad and run.guard.in_row == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, run.model.parameters(), strict=True))
    assert run.scheduler.scheduler.last_epoch == 1
