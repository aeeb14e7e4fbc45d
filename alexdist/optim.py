"""Optimizer and learning-rate schedule, both sized in optimizer steps (never in micro-steps or processes)."""

from __future__ import annotations

import math

import torch

from alexdist.config import Recipe, ScheduleConfig
from alexdist.errors import SetupError


def lr_factor(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr after `step` optimizer steps out of `total`."""
    warmup = int(cfg.warmup_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    if cfg.name == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    else:  # onecycle: linear warmup (above), then linear decay
        shape = max(0.0, 1.0 - t)
    return cfg.final_frac + (1 - cfg.final_frac) * shape


def kernel_kwargs(impl: str, device_type: str, sharded: bool = False) -> dict:
    """speed.optimizer_impl -> torch.optim kwargs. auto: one fused kernel wherever PyTorch has one for SGD and
    AdamW (CUDA and CPU; several times faster than the default per-parameter loop, see DEVELOPERS.md), else
    PyTorch's default. Sharded (FSDP2) parameters: foreach, because the fused kernels have no DTensor rule
    ("aten._fused_sgd_.default does not have a sharding strategy registered", torch 2.14)."""
    if sharded and impl == "fused":
        raise SetupError("speed.optimizer_impl=fused has no kernel for FSDP's sharded parameters; use auto or "
                         "foreach with distributed.strategy=fsdp")
    if sharded and impl == "auto":
        impl = "foreach"
    if impl == "auto":
        impl = "fused" if device_type in ("cuda", "cpu") else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False},
            "default": {}}[impl]


def make_optimizer(model: torch.nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    o = recipe.optim
    first = next(model.parameters())
    kw = kernel_kwargs(recipe.speed.optimizer_impl, first.device.type, sharded=hasattr(first, "device_mesh"))
    if o.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
            weight_decay=o.weight_decay, **kw,
        )
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=o.weight_decay, **kw)
