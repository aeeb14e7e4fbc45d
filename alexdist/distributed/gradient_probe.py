"""Where a step's small-batch gradient is seen, for the gradient noise scale (training/noise_scale.py): each
probe leaves |G_small|^2 in a device tensor during the step, without a host sync; the loop sums it over ranks in
the step's one all-reduce.

- AccumulationProbe: the first of train.grad_accum micro-batches (B_small = the per-process batch), any world
  size: DDP does not reduce before the last micro-batch.
- CommHookProbe: without accumulation on several processes, each rank's local gradient just before DDP's
  all-reduce, through a DDP communication hook (B_small = the per-process batch). Not under torch's Python
  reducer (`python_reducer`), which calls hooks per parameter.
"""

from __future__ import annotations

import torch


class GradientProbe:
    """Measures |G_small|^2 during a step (on the device); `b_small`: the small batch's size in examples."""

    b_small: int

    def __init__(self, device: torch.device):
        self._small_sq = torch.zeros((), dtype=torch.float32, device=device)

    @property
    def small_sq(self) -> torch.Tensor:
        """This step's |G_small|^2 so far, on the device."""
        return self._small_sq

    def start_step(self) -> None:
        self._small_sq.zero_()

    def after_backward(self, micro: int, params: list[torch.nn.Parameter]) -> None:
        """After micro-batch `micro`'s backward (0-based)."""


class AccumulationProbe(GradientProbe):
    """The first of `grad_accum` micro-batches against the whole step: after its backward a rank's gradients are
    that micro-batch's alone (DDP does not reduce before the last micro-batch), divided by grad_accum
    (Accelerate divides the loss)."""

    def __init__(self, device: torch.device, batch_size: int, grad_accum: int):
        super().__init__(device)
        self.b_small, self.grad_accum = batch_size, grad_accum

    def after_backward(self, micro: int, params: list[torch.nn.Parameter]) -> None:
        if micro == 0:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads)
                self._small_sq.copy_((norm * self.grad_accum).square())


class CommHookProbe(GradientProbe):
    """DDP: the squared norm of each parameter's local gradient, taken from every bucket just before its
    all-reduce (torch's own `allreduce_hook` then does what DDP does without a hook: divide by the world size and
    all-reduce). Kept per parameter and summed in parameter order: DDP rebuilds its buckets after the first
    iteration, and a sum taken bucket by bucket would round differently in a resumed run's first step than in the
    uninterrupted run's same step."""

    def __init__(self, device: torch.device, ddp_model, batch_size: int):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        super().__init__(device)
        self.b_small = batch_size
        index = {id(p): i for i, p in enumerate(ddp_model.module.parameters())}
        self._per_param = torch.zeros(len(index), dtype=torch.float32, device=device)
        positions: dict[tuple[int, ...], torch.Tensor] = {}  # per bucket layout, made once (no copy per step)

        def hook(state, bucket):
            key = tuple(id(p) for p in bucket.parameters())
            if key not in positions:
                positions[key] = torch.tensor([index[k] for k in key], device=device)
            norms = torch._foreach_norm([g.detach() for g in bucket.gradients()])
            self._per_param.index_copy_(0, positions[key], torch.stack(norms).float().square())
            return allreduce_hook(state, bucket)

        ddp_model.register_comm_hook(None, hook)

    def start_step(self) -> None:
        self._per_param.zero_()

    @property
    def small_sq(self) -> torch.Tensor:
        return self._per_param.sum()


def python_reducer(ddp_model: torch.nn.Module) -> bool:
    """Whether this DDP module reduces through torch's Python reducer (torch._dynamo.config.optimize_ddp =
    "python_reducer", read when DDP is built). It calls a communication hook once per parameter with a (grad, param)
    pair instead of a GradBucket and ignores the future the hook returns (torch/nn/parallel/distributed.py), so a
    bucket hook would fail in the first backward."""
    return bool(getattr(ddp_model, "_use_python_reducer", False))
