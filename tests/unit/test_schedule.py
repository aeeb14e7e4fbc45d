"""The learning-rate schedule and the batch arithmetic, sized in optimizer steps (pure functions)."""

import itertools
import math

import pytest

from alexdist.config import Recipe, ScheduleConfig
from alexdist.errors import ConfigError
from alexdist.training.build_run import resolve_batch_size
from alexdist.training.optim import (
    LRSchedule,
    apply_recipe_settings,
    lr_factor,
    optimizer_settings,
    peak_lr,
    resumed_anchor,
    warmup_steps,
)


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


@pytest.mark.parametrize("scaling, at_512", [("linear", 0.4), ("sqrt", 0.2), ("none", 0.1)])
def test_peak_lr_follows_the_effective_batch_by_the_scaling_rule_only_when_ref_batch_is_set(scaling, at_512):
    o = Recipe.model_validate({"optim": {"lr": 0.1, "ref_batch": 128, "lr_scaling": scaling}}).optim
    assert peak_lr(o, 128) == pytest.approx(0.1)
    assert peak_lr(o, 512) == pytest.approx(at_512)
    assert peak_lr(Recipe.model_validate({"optim": {"lr": 0.1}}).optim, 512) == pytest.approx(0.1)


def test_warmup_in_epochs_gives_a_short_large_batch_run_real_warmup_steps():
    # Batch 8192 on 60k images: 7 steps per epoch, 35 in 5 epochs. 1 % of them is no warmup at all.
    assert warmup_steps(ScheduleConfig(warmup_frac=0.01), 35, 7) == 0
    assert warmup_steps(ScheduleConfig(warmup_epochs=1), 35, 7) == 7
    assert warmup_steps(ScheduleConfig(warmup_frac=0.5, warmup_epochs=1), 35, 7) == 17  # the longer one
    assert warmup_steps(ScheduleConfig(warmup_epochs=10), 35, 7) == 8  # warmup in epochs: a quarter at most


def test_warmup_in_epochs_never_fills_a_short_run():
    """One warmup epoch of a 1-epoch run was the whole run: the lr rose to its peak at the last step and never
    decayed. Capped at a quarter, three quarters of the run decay; an explicit warmup_frac is taken as given."""
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1)
    assert warmup_steps(cfg, 468, 468) == 117  # 1 epoch of MNIST at batch 128
    factors = [lr_factor(s, 468, cfg, warmup=warmup_steps(cfg, 468, 468)) for s in range(468)]
    assert max(factors) == pytest.approx(1.0) and factors[-1] < 0.01  # the peak is reached and decayed from
    assert warmup_steps(cfg, 2340, 468) == 468  # 5 epochs: the one epoch asked for (20 %)
    assert warmup_steps(ScheduleConfig(warmup_frac=0.4), 100, 100) == 40
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1)
    factors = [lr_factor(s, 35, cfg, warmup=7) for s in range(9)]
    assert factors[:7] == pytest.approx([(s + 1) / 7 for s in range(7)])
    assert factors[7] == pytest.approx(1.0) and factors[8] < 1.0


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


@pytest.mark.parametrize("name", ["cosine", "onecycle"])
@pytest.mark.parametrize("resumed_at", [3, 40, 100])  # in the warmup, mid-decay, at the old schedule's end
def test_added_epochs_continue_the_decay_from_where_it_was_and_never_raise_the_lr(name, resumed_at):
    cfg = ScheduleConfig(name=name, warmup_epochs=1, final_frac=0.05)
    spe = 10  # steps per epoch: 10 epochs = 100 steps, extended to 25 epochs = 250
    old = LRSchedule(cfg, 100, warmup_steps(cfg, 100, spe))
    saved = {"train.epochs": 10, **{f"schedule.{k}": v for k, v in cfg.model_dump(mode="json").items()}}
    longer = Recipe.model_validate({"schedule": cfg.model_dump(), "train": {"epochs": 25}})
    anchor = resumed_anchor(saved, longer, None, resumed_at, spe)
    new = LRSchedule(cfg, 250, warmup_steps(cfg, 250, spe), anchor)
    assert new(resumed_at) == pytest.approx(old(resumed_at), abs=1e-12)  # no jump at the resume
    after = [new(s) for s in range(max(resumed_at, old.warmup), 251)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(after))  # never up after the warmup
    assert new(250) == pytest.approx(0.05)  # and it still ends at final_frac, at the new end
    if resumed_at < 100:
        assert new(resumed_at + 20) > old(resumed_at + 20)  # the longer run decays more slowly (it is useful)
    # Without the anchor the new schedule would jump up at the resume (the control: cosine at 40/100 vs 40/250).
    if name == "cosine" and resumed_at == 40:
        assert LRSchedule(cfg, 250, warmup_steps(cfg, 250, spe))(40) > old(40) + 0.2


def test_a_changed_schedule_applies_as_written_and_an_unchanged_one_keeps_its_anchor():
    cfg = ScheduleConfig(name="cosine")
    saved = {"train.epochs": 10, **{f"schedule.{k}": v for k, v in cfg.model_dump(mode="json").items()}}
    asked = Recipe.model_validate({"schedule": {"name": "constant"}, "train": {"epochs": 20}})
    assert resumed_anchor(saved, asked, [50, 0.5, 0], 50, 10) is None
    same = Recipe.model_validate({"schedule": cfg.model_dump(), "train": {"epochs": 10}})
    assert resumed_anchor(saved, same, [50, 0.5, 0], 70, 10) == [50, 0.5, 0]
    assert resumed_anchor(saved, same, None, 70, 10) is None


def test_resumed_optimizer_takes_the_recipes_settings_and_the_schedules_lr_at_its_position():
    import torch

    model = torch.nn.Linear(2, 2)
    cfg = ScheduleConfig(name="cosine")
    old_opt = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9, weight_decay=5e-4)
    old_sched = torch.optim.lr_scheduler.LambdaLR(old_opt, LRSchedule(cfg, 100, 0))
    for _ in range(10):
        old_opt.step()
        old_sched.step()
    new_opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.8, weight_decay=0.0)
    schedule = LRSchedule(ScheduleConfig(name="constant"), 100, 0)
    new_sched = torch.optim.lr_scheduler.LambdaLR(new_opt, lambda s: schedule(s))
    settings = optimizer_settings(new_opt)
    new_opt.load_state_dict(old_opt.state_dict())
    new_sched.load_state_dict(old_sched.state_dict())
    assert new_opt.param_groups[0]["lr"] < 0.25  # what a plain load leaves: the old lr and settings
    apply_recipe_settings(new_opt, new_sched, settings, schedule)
    g = new_opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.5, 0.8, 0.0) and new_sched.get_last_lr() == [0.5]
    new_opt.step()
    new_sched.step()
    assert new_opt.param_groups[0]["lr"] == 0.5  # and the schedule goes on from there (constant)
    # Unchanged settings write back exactly what was loaded.
    same = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9, weight_decay=5e-4)
    same_sched = torch.optim.lr_scheduler.LambdaLR(same, LRSchedule(cfg, 100, 0))
    settings = optimizer_settings(same)
    same.load_state_dict(old_opt.state_dict())
    same_sched.load_state_dict(old_sched.state_dict())
    loaded = dict(same.param_groups[0])
    apply_recipe_settings(same, same_sched, settings, LRSchedule(cfg, 100, 0))
    assert {k: v for k, v in same.param_groups[0].items() if k != "params"} == {
        k: v for k, v in loaded.items() if k != "params"}
