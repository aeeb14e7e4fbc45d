"""Launcher vs recipe: one rule decides the strategy, ZeRO stage, accumulation and precision (pure functions
of the environment `accelerate launch` sets and the recipe)."""

import pytest

from alexdist.config import Recipe
from alexdist.distributed.accelerator import _check_launcher_precision, amp_mode
from alexdist.distributed.strategy import resolve_strategy
from alexdist.errors import SetupError

DS = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_MIXED_PRECISION",
                "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"]:
        monkeypatch.delenv(key, raising=False)


def _recipe(strategy: str = "auto", **deepspeed):
    return Recipe.model_validate({"distributed": {"strategy": strategy, "deepspeed": deepspeed}})


def test_auto_with_a_silent_launcher_is_ddp():
    r = _recipe()
    s = resolve_strategy(r)
    assert (s.name, s.zero_stage) == ("ddp", None)
    assert r.distributed.strategy == "ddp"  # the resolved value is what config.yaml and W&B record


def test_auto_follows_a_deepspeed_launcher_config_and_records_its_stage(monkeypatch):
    for k, v in {**DS, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}.items():
        monkeypatch.setenv(k, v)
    r = _recipe()
    s = resolve_strategy(r)
    assert (s.name, s.zero_stage, s.describe()) == ("deepspeed", 3, "deepspeed ZeRO-3")
    assert r.distributed.strategy == "deepspeed" and r.distributed.deepspeed.zero_stage == 3
    assert r.distributed.deepspeed.offload_optimizer is True


def test_recipe_deepspeed_without_a_launcher_config_uses_the_recipe_stage():
    s = resolve_strategy(_recipe(strategy="deepspeed", zero_stage=1))
    assert (s.name, s.zero_stage) == ("deepspeed", 1)


def test_an_explicit_recipe_value_that_disagrees_with_the_launcher_stops_with_both_values(monkeypatch):
    for k, v in DS.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SetupError, match="launcher config says DeepSpeed but the recipe says distributed.strategy=ddp"):
        resolve_strategy(_recipe(strategy="ddp"))
    with pytest.raises(SetupError, match="ZeRO stage 3 but the recipe says distributed.deepspeed.zero_stage=2"):
        resolve_strategy(_recipe(strategy="deepspeed", zero_stage=2))


def test_launcher_accumulation_must_match_the_recipe(monkeypatch):
    for k, v in {**DS, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}.items():
        monkeypatch.setenv(k, v)
    r = Recipe.model_validate({"train": {"grad_accum": 2}})
    with pytest.raises(SetupError, match="gradient_accumulation_steps=4 but the recipe says train.grad_accum=2"):
        resolve_strategy(r)


@pytest.mark.parametrize("launched, precision, ok", [("no", "bf16", True), ("bf16", "bf16", True),
                                                     ("fp16", "bf16", False), ("no", "fp64", True),
                                                     ("bf16", "fp64", False)])
def test_launcher_mixed_precision_must_agree_with_the_recipe(monkeypatch, launched, precision, ok):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    r = Recipe.model_validate({"precision": precision})
    if ok:
        _check_launcher_precision(r)
    else:
        with pytest.raises(SetupError, match=f"--mixed_precision {launched} but the recipe says precision={precision}"):
            _check_launcher_precision(r)


def test_fp64_is_a_dtype_not_an_accelerate_mixed_precision():
    assert amp_mode("fp64") == "no" and amp_mode("bf16") == "bf16" and amp_mode("no") == "no"
