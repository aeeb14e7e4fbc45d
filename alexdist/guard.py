"""Divergence guard: skip optimizer steps whose loss or gradients are NaN/inf, and stop a run that keeps at it.

Who detects a bad step depends on who owns the optimizer step:
- DDP in fp32/bf16: we do. After backward the gradients are already all-reduced, so every rank sees the same
  non-finite gradient norm and skips the same step (no extra collective).
- fp16 under Accelerate (GradScaler) and DeepSpeed (ZeRO's own overflow check on the global gradient norm): the
  loss scaler skips the step and lowers the scale, as usual; we read `optimizer.step_was_skipped`.
Every rank then also flags a non-finite local loss, and the flags are agreed in the step's one all-reduce
(together with stop requests), so all ranks count the same bad steps. `train.max_bad_steps` bad steps in a row,
or an fp16 loss scale that has reached its minimum and still overflows, stop the run with DivergedError
before anything is saved: the last checkpoint on disk is the last good one. A skipped step also gives back the
BatchNorm running statistics its NaN forward pass wrote.
"""

from __future__ import annotations

import math

import torch

from alexdist.config import Recipe


class DivergenceGuard:
    def __init__(self, accelerator, optimizer, recipe: Recipe, deepspeed: bool):
        self.acc = accelerator
        self.optimizer = optimizer
        self.max_bad = recipe.train.max_bad_steps
        self.min_scale = recipe.distributed.fp16_min_loss_scale
        # Whether we decide the skip ourselves (no loss scaler owns the step).
        self.own_skip = not deepspeed and recipe.precision != "fp16"
        self.in_row = 0
        self.first_bad: int | None = None

    def remember_buffers(self, model: torch.nn.Module) -> None:
        """Before a step: a copy of the BatchNorm statistics and counters (a few KB), which a NaN forward poisons."""
        self._buffers = [b.detach().clone() for b in self.acc.unwrap_model(model).buffers()]

    def restore_buffers(self, model: torch.nn.Module) -> None:
        """After a skipped step: the statistics as they were, so the skipped step leaves no trace."""
        with torch.no_grad():
            for b, saved in zip(self.acc.unwrap_model(model).buffers(), self._buffers):
                b.copy_(saved)

    def grads_bad(self, model: torch.nn.Module, total_norm: torch.Tensor | None = None) -> bool:
        """Before optimizer.step(): True if we must skip it (non-finite gradients, fp32/bf16 DDP only)."""
        if not self.own_skip:
            return False
        if total_norm is None:  # clipping already computed it otherwise
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        return not bool(torch.isfinite(total_norm))

    def local_bad(self, skipped_by_us: bool, loss: torch.Tensor) -> bool:
        """After the step: this rank's view of whether the step was bad (agreed by the caller)."""
        return skipped_by_us or bool(self.optimizer.step_was_skipped) or not bool(torch.isfinite(loss.detach()))

    def loss_scale(self) -> float | None:
        """The current fp16 loss scale (GradScaler or DeepSpeed), None when there is none."""
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
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
                f"the fp16 loss scale collapsed to {scale:g} (distributed.fp16_min_loss_scale) and step {step} "
                f"still overflowed"
            )
        if self.in_row >= self.max_bad:
            span = f"step {step}" if self.in_row == 1 else f"steps {self.first_bad}-{step}"
            return f"the loss or gradients were NaN/inf for {self.in_row} optimizer steps in a row ({span}, " \
                   f"train.max_bad_steps={self.max_bad})"
        return None


def nan_like(x: torch.Tensor) -> torch.Tensor:
    """An input that makes the loss NaN (fault injection)."""
    return x * math.nan
