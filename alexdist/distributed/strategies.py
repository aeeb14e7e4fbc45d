"""The strategies by name, and the one rule that picks a run's: `resolve_strategy(recipe)` from the recipe and
the launcher; `checkpoint_strategy(path)`, the strategy whose files a checkpoint holds. The base
(distributed/strategy.py) imports none of its implementations; this registry imports all three."""

from __future__ import annotations

import os
from pathlib import Path

from alexdist.config import Recipe
from alexdist.distributed.ddp import DDPStrategy
from alexdist.distributed.deepspeed import DeepSpeedStrategy
from alexdist.distributed.fsdp import FSDP2Strategy
from alexdist.distributed.strategy import Strategy
from alexdist.errors import SetupError


def strategies() -> list[type[Strategy]]:
    return [DDPStrategy, DeepSpeedStrategy, FSDP2Strategy]


def strategy_named(name: str, zero_stage: int | None = None) -> Strategy:
    cls = next(c for c in strategies() if c.name == name)
    return cls(zero_stage) if zero_stage is not None else cls()


def checkpoint_strategy(path: Path) -> type[Strategy]:
    """The strategy whose files a checkpoint directory holds (DDP's safetensors shards when none claims it)."""
    return next((c for c in reversed(strategies()) if c.owns_checkpoint(path)), strategies()[0])


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def resolve_strategy(recipe: Recipe) -> Strategy:
    """The strategy from the recipe and the launcher, by one rule; written back into the recipe.

    The launcher speaks through the environment `accelerate launch` sets from its config file. A recipe value
    of `auto` follows the launcher (DDP if it says nothing); an explicit recipe value must agree with the
    launcher, else the run stops with both values shown. Nothing is resolved silently, and the resolved values
    are what config.yaml and the trackers record.
    """
    name, stage = _resolve(recipe)
    d = recipe.distributed
    d.strategy = name
    if stage is not None:
        d.deepspeed.zero_stage = stage
    if os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower() == "cpu":
        d.deepspeed.offload_optimizer = True
    strategy = strategy_named(name, stage)
    strategy.refuse_unsupported(recipe)
    return strategy


def _resolve(recipe: Recipe) -> tuple[str, int | None]:
    d = recipe.distributed
    if _env_flag("ACCELERATE_USE_FSDP"):  # `accelerate launch --use_fsdp` or recipes/accelerate/fsdp.yaml
        if d.strategy not in ("auto", "fsdp"):
            raise SetupError(
                f"the launcher config says FSDP but the recipe says distributed.strategy={d.strategy}; drop one of "
                f"them (distributed.strategy=auto follows the launcher)"
            )
        return "fsdp", None
    launcher_ds = _env_flag("ACCELERATE_USE_DEEPSPEED")
    launcher_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if d.strategy == "ddp" and launcher_ds:
        raise SetupError(
            "the launcher config says DeepSpeed but the recipe says distributed.strategy=ddp; drop one of them "
            "(distributed.strategy=auto follows the launcher)"
        )
    if launcher_ds:
        stage = int(launcher_stage) if launcher_stage else d.deepspeed.zero_stage
        if d.strategy == "deepspeed" and launcher_stage and stage != d.deepspeed.zero_stage:
            raise SetupError(
                f"the launcher config says ZeRO stage {stage} but the recipe says distributed.deepspeed.zero_stage="
                f"{d.deepspeed.zero_stage}; make them agree or set distributed.strategy=auto to follow the launcher"
            )
        gas = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
        if gas and gas.isdigit() and int(gas) != recipe.train.grad_accum:
            raise SetupError(
                f"the launcher config says gradient_accumulation_steps={gas} but the recipe says train.grad_accum="
                f"{recipe.train.grad_accum}; set it in one place (the recipe is the usual one)"
            )
        return "deepspeed", stage
    if d.strategy in ("deepspeed", "fsdp"):
        return d.strategy, d.deepspeed.zero_stage if d.strategy == "deepspeed" else None
    return "ddp", None
