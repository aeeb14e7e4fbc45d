"""Optimizer and learning-rate schedule, both sized in optimizer steps (never in micro-steps or processes)."""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable

import torch

from alexdist.config import OptimConfig, Recipe, ScheduleConfig
from alexdist.errors import SetupError


def peak_lr(o: OptimConfig, effective_batch: int) -> float:
    """optim.lr for optim.ref_batch, scaled to the run's effective batch by optim.lr_scaling (if ref_batch is set)."""
    if not o.ref_batch or o.lr_scaling == "none":
        return o.lr
    ratio = effective_batch / o.ref_batch
    return o.lr * (ratio if o.lr_scaling == "linear" else math.sqrt(ratio))


# Warmup in epochs never takes more than this share of a run's optimizer steps: a 1-epoch run of a recipe with
# one warmup epoch would otherwise be all warmup and never decay (tests/e2e/test_recipes_learn.py measures it). A
# quarter keeps the warmup the study tuned (one epoch of five: 20 %) and leaves three quarters of any run to the
# decay; Goyal et al. warm up for 5 of 90 epochs (6 %). An explicit schedule.warmup_frac is taken as given.
WARMUP_CAP = 0.25


def warmup_steps(cfg: ScheduleConfig, total: int, steps_per_epoch: int) -> int:
    """The warmup's length in optimizer steps: the longer of schedule.warmup_frac and schedule.warmup_epochs,
    the latter capped at WARMUP_CAP of the run."""
    in_epochs = min(round(cfg.warmup_epochs * steps_per_epoch), int(WARMUP_CAP * total))
    return max(int(cfg.warmup_frac * total), in_epochs)


def lr_factor(step: int, total: int, cfg: ScheduleConfig, warmup: int | None = None,
              anchor: list[float] | None = None) -> float:
    """Multiplier of the peak lr after `step` optimizer steps out of `total`, `warmup` of them warming up
    (default: schedule.warmup_frac of them). `anchor` [step, progress, warmup]: the decay's progress continues
    from `progress` at that step to 1 at `total` (a resume that changed train.epochs: LRSchedule.extend)."""
    warmup = int(cfg.warmup_frac * total) if warmup is None else warmup
    if anchor is not None:
        warmup = int(anchor[2])
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    t = _progress(step, total, warmup, anchor)
    if cfg.name == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    elif cfg.name == "step":  # torchvision's StepLR(30, 0.1) over 90 epochs, for any length of run
        shape = 0.1 ** min(2, int(3 * t + 1e-9))
    elif cfg.name == "poly":  # Caffe's poly policy, power 2, as the LARS paper's runs
        shape = max(0.0, 1.0 - t) ** 2
    else:  # onecycle: linear warmup (above), then linear decay
        shape = max(0.0, 1.0 - t)
    return cfg.final_frac + (1 - cfg.final_frac) * shape


def _progress(step: int, total: int, warmup: int, anchor: list[float] | None) -> float:
    """How far the decay is, from 0 (end of warmup) to 1 (the last step)."""
    if anchor is None:
        return (step - warmup) / max(1, total - warmup)
    start, done = anchor[0], anchor[1]
    return done + (1 - done) * (step - start) / max(1, total - start)


class LRSchedule:
    """The lr multiplier per optimizer step (lr_factor) for a run of `total` steps. A resume that changed
    train.epochs (and not the schedule itself) continues the decay from where the checkpoint's schedule was
    (`extend`): the lr never jumps up when epochs are added; a changed schedule.* applies as written."""

    def __init__(self, cfg: ScheduleConfig, total: int, warmup: int, anchor: list[float] | None = None):
        self.cfg, self.total, self.warmup, self.anchor = cfg, total, warmup, anchor

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.cfg, self.warmup, self.anchor)

    def progress(self, step: int) -> float:
        warmup = int(self.anchor[2]) if self.anchor is not None else self.warmup
        return min(1.0, max(0.0, _progress(step, self.total, warmup, self.anchor)))

    def anchor_at(self, step: int) -> list[float]:
        """Where a longer (or shorter) run resumed at `step` goes on from: the warmup keeps its length and the
        decay its progress at this step (at the warmup's end if `step` is still in it)."""
        warmup = int(self.anchor[2]) if self.anchor is not None else self.warmup
        start = max(step, warmup)
        return [start, self.progress(start), warmup]


def resumed_anchor(saved: dict, recipe: Recipe, anchor: list[float] | None, position: int,
                   steps_per_epoch: int) -> list[float] | None:
    """The schedule anchor of a resumed run, from the checkpoint's flat config `saved`: a changed schedule.*
    applies as written (None); a changed train.epochs alone continues the checkpoint's decay from `position`;
    otherwise the checkpoint's anchor (an earlier extension) stays."""
    now = {f"schedule.{k}": v for k, v in recipe.schedule.model_dump(mode="json").items()}
    if any(saved.get(k, v) != v for k, v in now.items()):
        return None
    old_epochs = saved.get("train.epochs", recipe.train.epochs)
    if old_epochs == recipe.train.epochs:
        return anchor
    old_total = old_epochs * steps_per_epoch
    old = LRSchedule(recipe.schedule, old_total, warmup_steps(recipe.schedule, old_total, steps_per_epoch), anchor)
    return old.anchor_at(position)


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's settings as built from the recipe (lr, momentum, weight decay, LARS's trust
    settings, ...), taken before a checkpoint's optimizer state overwrites them."""
    return [{k: v for k, v in g.items() if k != "params"} for g in innermost(optimizer).param_groups]


def schedule_step(scheduler) -> int:
    """The schedule's position: optimizer steps taken, less the skipped (NaN/inf) ones."""
    return getattr(scheduler, "scheduler", scheduler).last_epoch  # Accelerate's wrapper holds the LambdaLR


def apply_recipe_settings(optimizer: torch.optim.Optimizer, scheduler, settings: list[dict],
                          schedule: LRSchedule) -> None:
    """After a resume: the recipe's optimizer settings over the checkpoint's (its momentum buffers and other
    state stay), and the lr of the schedule's position under the recipe's peak lr and `schedule`. With an
    unchanged recipe this writes back exactly what was loaded (the same base lr times the same factor LambdaLR
    computes)."""
    groups = innermost(optimizer).param_groups
    if len(groups) != len(settings):
        raise SetupError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this run's has "
                         f"{len(settings)}; resume with the checkpoint's optim.* settings")
    factor = schedule(schedule_step(scheduler))
    for group, fresh in zip(groups, settings, strict=True):
        group.update(fresh)
        group["lr"] = fresh["initial_lr"] * factor
    lambda_lr = getattr(scheduler, "scheduler", scheduler)
    lambda_lr.base_lrs = [g["initial_lr"] for g in groups]
    lambda_lr._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports until the next step


def innermost(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's and DeepSpeed's wrappers (whose parameter groups are its own)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


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
    sharded = hasattr(first, "device_mesh")
    if o.name == "lars":
        return _lars(model, o, lr, recipe.speed.optimizer_impl)
    kw = kernel_kwargs(recipe.speed.optimizer_impl, first.device.type, sharded)
    if o.name == "sgd":
        opt = without_dynamo(lambda: torch.optim.SGD(
            model.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
            weight_decay=o.weight_decay, **kw,
        ), recipe.speed.compile)
        if kw.get("fused") and o.momentum > 0:
            zero_momentum_buffers(opt)
        return opt
    return without_dynamo(lambda: torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=o.weight_decay, **kw),
                          recipe.speed.compile)


def without_dynamo(build: Callable[[], torch.optim.Optimizer], compiling: bool) -> torch.optim.Optimizer:
    """`build()` (torch's SGD or AdamW), kept from importing torch._dynamo in a process that compiles nothing.
    torch.optim imports it (~1.2 s per process, with sympy, pandas and scikit-learn) only to keep torch.compile out
    of the optimizer: on the first call of each method wrapped by `torch._disable_dynamo` (add_param_group, called
    by the constructor; zero_grad; state_dict), which caches `torch._dynamo.disable(fn)` as `fn.__dynamo_disable`,
    and in every step (`_use_grad_for_differentiable`: two graph breaks, no-ops outside a compilation). While
    torch._dynamo is not imported nothing can be compiling, so there is nothing to keep out: those caches are
    seeded with a call that runs the method itself until torch._dynamo is imported and then caches torch's own,
    and the step runs torch's under the same grad mode without the graph breaks until then. Applied only with
    speed.compile off and torch._dynamo not imported yet; wrappers other than torch 2.14's are left as they are."""
    if compiling or "torch._dynamo" in sys.modules:
        return build()
    disable_code = torch._disable_dynamo(lambda: None).__code__  # torch's wrapper, to recognise the methods
    for method in vars(torch.optim.Optimizer).values():
        if getattr(method, "__code__", None) is disable_code:
            cell = dict(zip(disable_code.co_freevars, method.__closure__, strict=True)).get("fn")
            if cell is not None and getattr(cell.cell_contents, "__dynamo_disable", None) is None:
                cell.cell_contents.__dynamo_disable = _until_dynamo(cell.cell_contents, method)
    optimizer = build()
    from torch.optim.optimizer import _use_grad_for_differentiable

    grad_code = _use_grad_for_differentiable(lambda: None).__code__
    wrapped = type(optimizer).step  # torch's profiling hooks around _use_grad around the step itself
    while wrapped is not None and getattr(wrapped, "__code__", None) is not grad_code:
        wrapped = getattr(wrapped, "__wrapped__", None)
    if wrapped is None:
        return optimizer

    def step(self, *args, **kwargs):
        if "torch._dynamo" in sys.modules:
            return wrapped(self, *args, **kwargs)
        with torch.set_grad_enabled(self.defaults["differentiable"]):  # what _use_grad does besides graph breaks
            return wrapped.__wrapped__(self, *args, **kwargs)

    optimizer.step = types.MethodType(torch.optim.Optimizer.profile_hook_step(step), optimizer)
    return optimizer


def _until_dynamo(fn: Callable, wrapper: Callable) -> Callable:
    """`fn` itself while torch._dynamo is not imported; from then on torch's `wrapper` computes and caches its own."""

    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        vars(fn).pop("__dynamo_disable", None)
        return wrapper(*args, **kwargs)

    return call


def zero_momentum_buffers(opt: torch.optim.SGD) -> None:
    """Give fused SGD its momentum buffers as zeros, just before its first step. That step would otherwise
    allocate them with `torch.empty_like`, and if fp16's GradScaler skips it (found_inf: the fused kernel returns
    without writing) the never-written memory is kept as momentum and the next step adds 0.9 x garbage. With no
    dampening a zero buffer gives the same first update as torch's clone-the-gradient init: 0.9 x 0 + g = g.
    A pre-step hook rather than at construction: DeepSpeed swaps the parameter groups for its flat partitions
    after we build the optimizer, and a resumed run's loaded buffers must win (and cost no allocation). The hook
    stays registered and does nothing after the first step: removing itself while torch iterates the hooks would
    break any hook registered after it ("OrderedDict mutated during iteration")."""
    done = False

    def first_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        nonlocal done
        if done:
            return
        done = True
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)

    opt.register_step_pre_hook(first_step)


def _lars(model: torch.nn.Module, o: OptimConfig, lr: float, impl: str) -> torch.optim.Optimizer:
    """timm's Lars over two groups: weight matrices and conv kernels adapted (and decayed by optim.weight_decay);
    1-D tensors (BatchNorm weights, biases) neither. timm adapts a group only if it has weight decay unless its
    `always_adapt` is set, so at weight_decay=0 LARS would silently be plain SGD at LARS's lr: the weight group
    always adapts. timm's param_groups_weight_decay makes the split (asked with a non-zero decay: at 0 it puts
    everything in one group). timm has no fused kernel and picks its own per-tensor or foreach kernels; sharded
    (FSDP2) parameters get ShardedLars."""
    from timm.optim import Lars, param_groups_weight_decay

    if impl == "fused":
        raise SetupError("speed.optimizer_impl=fused has no LARS kernel; use auto with optim.name=lars")
    groups = param_groups_weight_decay(model, weight_decay=1.0)  # the split only; the decay is set below
    for g in groups:
        adapted = g["weight_decay"] != 0
        g.update(weight_decay=o.weight_decay if adapted else 0.0, always_adapt=adapted)
    cls = sharded_lars() if hasattr(next(model.parameters()), "device_mesh") else Lars
    return cls(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
               weight_decay=o.weight_decay, trust_coeff=o.trust_coeff, trust_clip=o.trust_clip)


def sharded_lars() -> type:
    """timm's Lars for FSDP2's sharded parameters. Each tensor's norm is the square root of its shards' squared
    norms summed over the ranks, every tensor's in one all-reduce per step; timm's own norms of DTensors each
    reduce on their own (75 tiny all-reduces per step for alexnet_bn's 15 adapted tensors, counted on 2 CPU
    ranks). The trust ratios then scale the gradients in place (weight decay folded in) and timm's step runs
    on as plain momentum SGD: the same update, computed on each rank's shard."""
    from timm.optim import Lars

    from alexdist.distributed.collectives import local

    def trust_ratio(w_norm, g_norm, g: dict) -> torch.Tensor:
        # timm's formula (timm/optim/lars.py), on whole-tensor norms: 1 where either norm is 0; LARC's clip.
        ratio = g["trust_coeff"] * w_norm / (g_norm + w_norm * g["weight_decay"] + g["eps"])
        ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
        return torch.clamp(ratio / g["lr"], max=1.0) if g["trust_clip"] else ratio

    class ShardedLars(Lars):
        @torch.no_grad()
        def step(self, closure=None):
            adapted = [g for g in self.param_groups if g["weight_decay"] != 0 or g["always_adapt"]]
            pairs = [(p, g) for g in adapted for p in g["params"] if p.grad is not None]
            if pairs:
                weights, grads = [local(p) for p, _ in pairs], [local(p.grad) for p, _ in pairs]
                squares = torch.stack(torch._foreach_norm(weights) + torch._foreach_norm(grads)).square()
                torch.distributed.all_reduce(squares, group=pairs[0][0].device_mesh.get_group())
                norms = squares.sqrt()
                for i, ((_, g), w, grad) in enumerate(zip(pairs, weights, grads, strict=True)):
                    ratio = trust_ratio(norms[i], norms[len(pairs) + i], g)
                    grad.add_(w, alpha=g["weight_decay"]).mul_(ratio)
            saved = [(g, g["weight_decay"], g["always_adapt"]) for g in adapted]
            for g in adapted:
                g["weight_decay"], g["always_adapt"] = 0.0, False
            try:
                return super().step(closure)
            finally:
                for g, wd, always in saved:
                    g["weight_decay"], g["always_adapt"] = wd, always

    return ShardedLars
