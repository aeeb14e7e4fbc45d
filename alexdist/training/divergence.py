"""Divergence guard: skip optimizer steps whose loss or gradients are NaN/inf, and stop a run that keeps at it.

Who detects a bad step depends on who owns the optimizer step:
- DDP (fp32, bf16, fp64 and fp16): we do. After backward (gradients already all-reduced; under fp16 unscaled
  first) each rank flags a non-finite loss or gradient norm; the flags are agreed in the step's one all-reduce,
  which also carries stop requests and is the step's only host sync. In fp32/bf16/fp64 a bad step is then not
  handed to the optimizer at all. Under fp16 it still is: the GradScaler must see it to lower its scale, and it
  skips the update itself. We never ask Accelerate whether the scaler skipped (`optimizer.step_was_skipped`):
  with a fused optimizer the scaler hands every step to the kernel, which skips internally, so Accelerate
  always says "not skipped" (accelerate #4242) and the schedule would advance on skipped steps.
- DeepSpeed: ZeRO's own overflow check on the global gradient norm skips the step inside the engine's step
  (which Accelerate runs in backward); the strategy reads the engine's overflow flag (Strategy.engine_skipped).
Every rank also flags a non-finite local loss, and everything is agreed, so all ranks count the same bad
steps. `train.max_bad_steps` bad steps in a row, or an fp16 loss scale that has reached its minimum and still
overflows, stop the run with DivergedError before anything is saved: the last checkpoint on disk is the last
good one. A skipped step also gives back the BatchNorm running statistics its NaN forward pass wrote.
"""

from __future__ import annotations

import math

import torch

from alexdist.config import Recipe
from alexdist.distributed.collectives import full, plain_module
from alexdist.distributed.strategy import Strategy
from alexdist.errors import DivergedError


class DivergenceGuard:
    def __init__(self, accelerator, optimizer, recipe: Recipe, strategy: Strategy):
        self.accelerator = accelerator
        self.optimizer = optimizer
        self.max_bad = recipe.train.max_bad_steps
        self.min_scale = recipe.distributed.deepspeed.fp16_min_loss_scale
        self.strategy = strategy
        # The strategy's own engine decides whether a step is skipped (DeepSpeed): its scaler, not Accelerate's.
        engine = strategy.engine_steps
        self.fp16_scaler = not engine and getattr(accelerator, "scaler", None) is not None
        # Whether we keep a bad step from the optimizer ourselves (no loss scaler or engine owns the step).
        self.own_skip = not engine and not self.fp16_scaler
        self.in_row = 0
        self.first_bad: int | None = None
        self._live: list[torch.Tensor] | None = None  # the model's buffers (detached views)
        self._saved: list[torch.Tensor] = []
        self._params: list[torch.nn.Parameter] | None = None

    def remember_buffers(self, model: torch.nn.Module) -> None:
        """Before a step: a copy of the BatchNorm statistics and counters (a few KB), which a NaN forward poisons.
        One foreach copy into tensors allocated once; the buffers are looked up once (unwrapping the model costs
        milliseconds: Accelerate probes the installed packages)."""
        if self._live is None:
            self._live = [b.detach() for b in plain_module(self.accelerator, model).buffers()]
            self._saved = [b.clone() for b in self._live]
        elif self._live:
            torch._foreach_copy_(self._saved, self._live)

    def restore_buffers(self) -> None:
        """After a skipped step: the statistics as they were, so the skipped step leaves no trace."""
        if self._live:
            with torch.no_grad():
                torch._foreach_copy_(self._live, self._saved)

    def bad_flag(self, model: torch.nn.Module, loss: torch.Tensor,
                 total_norm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After backward, before the optimizer step: this rank's "the step is bad" as a device tensor (no sync;
        the caller agrees it across ranks), and the reduced gradients' norm (unscaled under fp16; None where the
        strategy's engine owns the step). `total_norm` is the clipped gradients' norm, if clipping ran (under
        fp16 it unscaled the gradients first)."""
        bad = ~torch.isfinite(loss.detach())
        skipped = self.strategy.engine_skipped(self.optimizer)
        if skipped is not None:  # the engine checked the global norm in backward and skipped the step already
            return (torch.ones_like(bad) if skipped else bad), None
        if total_norm is None:
            if self.fp16_scaler:
                self.accelerator.unscale_gradients()  # the scaler's own inf check; its step() then sees the result
            if self._params is None:
                self._params = list(model.parameters())
            grads = [p.grad for p in self._params if p.grad is not None]
            total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
        norm = full(total_norm).to(loss.device)  # FSDP: a DTensor, gathered
        return bad | ~torch.isfinite(norm), norm

    def loss_scale_tensor(self) -> torch.Tensor | None:
        """The fp16 GradScaler's current scale on the device (no sync), None without one."""
        return self.accelerator.scaler._get_scale_async() if self.fp16_scaler else None

    def loss_scale(self) -> float | None:
        """The current fp16 loss scale (GradScaler or DeepSpeed), None when there is none. A host sync."""
        if self.fp16_scaler:
            return float(self.accelerator.scaler.get_scale())
        inner = getattr(self.optimizer, "optimizer", None)
        scale = getattr(inner, "loss_scale", None) if inner is not None else None
        return float(scale) if isinstance(scale, (int, float)) and getattr(inner, "dynamic_loss_scale", False) else None

    def update(self, step: int, bad: bool) -> str | None:
        """Count an agreed bad/good step; the reason to stop, if the run must stop."""
        if not bad:
            self.in_row, self.first_bad = 0, None
            return None
        self.in_row += 1
        self.first_bad = self.first_bad or step
        scale = self.loss_scale()
        if scale is not None and scale <= self.min_scale * (1 + 1e-6) and self.in_row > 1:
            return (
                f"the fp16 loss scale collapsed to {scale:g} (distributed.deepspeed.fp16_min_loss_scale) and step "
                f"{step} still overflowed"
            )
        if self.in_row >= self.max_bad:
            span = f"step {step}" if self.in_row == 1 else f"steps {self.first_bad}-{step}"
            return f"the loss or gradients were NaN/inf for {self.in_row} optimizer steps in a row ({span}, " \
                   f"train.max_bad_steps={self.max_bad})"
        return None


def diverged(why: str, newest_checkpoint: str | None) -> DivergedError:
    """The one-line error of a run that had to stop because it diverged."""
    return DivergedError(
        f"training diverged: {why}; the newest checkpoint ({newest_checkpoint or 'none yet'}) holds good "
        f"weights (skipped steps change nothing, non-finite weights are never saved): resume from it with a "
        f"lower optim.lr or with train.grad_clip set"
    )


def nan_like(x: torch.Tensor) -> torch.Tensor:
    """An input that makes the loss NaN (fault injection)."""
    return x * math.nan
