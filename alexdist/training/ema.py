"""An exponential moving average (EMA) of the weights, as timm's `--model-ema` and torchvision's reference
scripts keep one: after every good optimizer step

    ema = decay_t * ema + (1 - decay_t) * weights,   decay_t = min(train.ema_decay, (1 + t) / (10 + t))

(timm's warm-up: early updates follow the weights closely, so the average does not remember the random init).
Parameters only: BatchNorm statistics are copied, i.e. the EMA weights are evaluated and saved with the live
model's running statistics (agreed across ranks before every evaluation), which keeps the EMA identical on
every rank and exactly resumable without saving per-rank statistics. The average is kept in fp32 on the device.

DDP and ZeRO-1/2 (every rank holds whole parameters); ZeRO-3 and FSDP shard them and are refused.

Why not torch.optim.swa_utils.AveragedModel (timm's ModelEmaV3 is the same idea): it keeps a deep copy of the
module and evaluates that copy, with buffers either averaged per rank or frozen at the copy's; here the EMA
is swapped into the live module for the evaluation, so it runs through exactly the path the model does (the
unwrapped DDP module, Accelerate's autocast, channels_last, the DeepSpeed engine's module) with the statistics
agreed across ranks, and the checkpointed state is the averaged parameters alone.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class ModelEMA:
    """The EMA of a module's parameters; `state_dict`/`load_state_dict` put it in every checkpoint (Accelerate's
    register_for_checkpointing)."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = True):
        self.module = module
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self._live = list(module.parameters())
        self.params = [p.detach().float().clone() for p in self._live]

    def decay_now(self) -> float:
        t = self.updates
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """After a good optimizer step (a skipped one changes nothing)."""
        weight = 1.0 - self.decay_now()
        torch._foreach_lerp_(self.params, [p.detach().float() for p in self._live], weight)
        self.updates += 1

    def weights(self) -> dict[str, torch.Tensor]:
        """The module's state dict with the EMA (fp32) in place of its parameters: what train.ema_is_model saves."""
        names = [n for n, _ in self.module.named_parameters()]
        return {**self.module.state_dict(), **dict(zip(names, self.params, strict=True))}

    @contextmanager
    def swapped(self):
        """The module holds the EMA weights inside the block, its own weights again after it."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self._live]
            torch._foreach_copy_([p.data for p in self._live], [e.to(p.dtype) for e, p in zip(self.params, self._live,
                                                                                              strict=True)])
        try:
            yield self.module
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self._live], saved)

    def state_dict(self) -> dict:
        return {"params": [p.cpu() for p in self.params], "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.params, [p.to(q.device) for p, q in zip(state["params"], self.params,
                                                                              strict=True)])
        self.updates = int(state["updates"])
