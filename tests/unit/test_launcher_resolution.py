"""Launcher vs recipe: one rule decides the strategy, ZeRO stage, accumulation and precision (pure functions
of the environment `accelerate launch` sets and the recipe)."""

import pytest
import torch
from helpers import ROOT

from alexdist.config import Recipe
from alexdist.distributed.accelerator import _check_launcher_precision, amp_mode, gpu_plan, make_accelerator
from alexdist.distributed.strategies import resolve_strategy
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


@pytest.mark.parametrize("processes, gpus, says", [
    (2, 0, None),  # a CPU machine: gloo ranks, any number
    (2, 1, "error:2 processes on this node but 1 GPU visible; launch --num_processes 1"),  # the 1-GPU workstation
    (2, 8, "2 processes on this node but 8 GPUs visible: 6 stay idle"),  # a packaged config on an 8-GPU node
    (8, 8, None),
])
def test_processes_are_matched_to_the_gpus_a_node_has(processes, gpus, says):
    plan = gpu_plan(processes, gpus)
    assert plan == says if says is None else plan.startswith(says)


def test_sync_batchnorm_is_ddp_on_gpus_only_and_refused_elsewhere_in_one_line(monkeypatch):
    from alexdist.distributed.ddp import DDPStrategy
    from alexdist.distributed.fsdp import FSDP2Strategy
    from alexdist.models import build_model

    recipe = Recipe.model_validate({"model": {"sync_bn": True}})
    with pytest.raises(SetupError, match="model.sync_bn needs GPUs"):  # torch's own error comes mid-forward
        DDPStrategy().refuse_unsupported(recipe)
    with pytest.raises(SetupError, match="ddp strategy only"):
        FSDP2Strategy().refuse_unsupported(recipe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    DDPStrategy().refuse_unsupported(recipe)
    model = DDPStrategy().shard(build_model("alexnet_bn", 32, 0.0, 0.25), recipe)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds
    assert set(model.state_dict()) == set(build_model("alexnet_bn", 32, 0.0, 0.25).state_dict())  # same weights


def test_the_quickstart_runs_on_the_cpu_whatever_gpus_the_machine_has(monkeypatch):
    """`make quickstart` hides the GPUs (CUDA_VISIBLE_DEVICES=), so its 2 processes are the README's 2 CPU
    processes; without that a 1-GPU workstation refuses the launch in one line instead of failing in rank 1."""
    import re

    recipe = (ROOT / "Makefile").read_text().split("\nquickstart:")[1].split("\n\n")[0]
    assert re.search(r"CUDA_VISIBLE_DEVICES= \S*accelerate launch --multi_gpu --num_processes 2", recipe)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SetupError, match="2 processes on this node but 1 GPU visible"):
        make_accelerator(Recipe(), resolve_strategy(Recipe()))


