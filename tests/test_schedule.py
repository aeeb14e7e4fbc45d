"""The learning-rate schedule and the batch arithmetic, sized in optimizer steps (pure functions)."""

import math

import pytest

from alexdist.config import Recipe, ScheduleConfig
from alexdist.errors import ConfigError
from alexdist.optim import lr_factor
from alexdist.run import peak_lr, resolve_batch_size


def test_warmup_rises_linearly_to_the_peak_in_optimizer_steps():
    cfg = ScheduleConfig(name="cosine", warmup_frac=0.1)
    factors = [lr_factor(s, 100, cfg) for s in range(12)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)  # the first step after warmup is at the peak
    assert factors[11] < 1.0


def test_cosine_decays_from_the_peak_to_final_frac_and_stays_there():
    cfg = ScheduleConfig(name="cosine", final_frac=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(130, 100, cfg) == pytest.approx(0.1)  # past the end (a longer resumed run): clamped
    mid = lr_factor(25, 100, cfg)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_onecycle_decays_linearly_after_warmup_and_constant_stays_flat():
    one = ScheduleConfig(name="onecycle", warmup_frac=0.2)
    assert lr_factor(19, 100, one) == pytest.approx(1.0)
    assert lr_factor(60, 100, one) == pytest.approx(0.5)
    assert lr_factor(100, 100, one) == pytest.approx(0.0)
    flat = ScheduleConfig(name="constant", warmup_frac=0.1)
    assert [lr_factor(s, 100, flat) for s in (0, 9, 10, 99)] == pytest.approx([0.1, 1.0, 1.0, 1.0])


def test_peak_lr_scales_linearly_with_the_effective_batch_only_when_ref_batch_is_set():
    r = Recipe.model_validate({"optim": {"lr": 0.1, "ref_batch": 128}})
    assert peak_lr(r, 128) == pytest.approx(0.1)
    assert peak_lr(r, 512) == pytest.approx(0.4)
    assert peak_lr(Recipe.model_validate({"optim": {"lr": 0.1}}), 512) == pytest.approx(0.1)


@pytest.mark.parametrize("world, accum, per", [(1, 1, 256), (2, 1, 128), (4, 2, 32), (8, 4, 8)])
def test_global_batch_gives_the_per_process_batch_that_keeps_it(world, accum, per):
    r = Recipe.model_validate({"train": {"global_batch": 256, "grad_accum": accum}})
    resolve_batch_size(r, world)
    assert r.train.batch_size == per
    assert r.train.batch_size * world * accum == 256


def test_a_global_batch_that_does_not_divide_is_refused_with_the_numbers():
    r = Recipe.model_validate({"train": {"global_batch": 100, "grad_accum": 3}})
    with pytest.raises(ConfigError, match="global_batch=100 is not divisible by 2 processes x train.grad_accum=3"):
        resolve_batch_size(r, 2)
    untouched = Recipe.model_validate({"train": {"batch_size": 64}})
    resolve_batch_size(untouched, 8)  # no global_batch: the per-process batch stays
    assert untouched.train.batch_size == 64
