"""Numerics that training relies on for correctness, whatever the speed options: the dtype the model computes
in, and BatchNorm that keeps its statistics and arithmetic in fp32 under half precision.

Who casts what, per `precision`:
- `no`: fp32 everywhere.
- `fp64`: model and inputs in float64 (a debug precision: the equivalence tests prove the distributed semantics
  in it, where fp32 kernels' summation order cannot hide or fake a difference).
- `fp16`/`bf16` under DDP: Accelerate's autocast; weights, gradients and optimizer state stay fp32.
- `fp16`/`bf16` under DeepSpeed: the engine casts the module's parameters to 16 bit and runs no autocast, so
  inputs are cast by hand (`compute_dtype`). DeepSpeed < 0.19.2 casts the buffers too (`module.half()`, checked
  in the 0.19.1 sdist's engine.py; 0.19.2 casts parameters only, DeepSpeed #8066): `restore_fp32_buffers` casts
  BatchNorm's running statistics back, so every supported version trains the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str, deepspeed: bool) -> torch.dtype:
    """The dtype of the model's inputs (and, for fp64 and DeepSpeed half precision, of its parameters)."""
    if precision == "fp64":
        return torch.float64
    if deepspeed and precision in HALF:
        return HALF[precision]
    return torch.float32


def loss_input(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the loss sees them: fp32 (or fp64 under precision=fp64; a cast to fp32 would round its
    gradients to fp32 too)."""
    return logits if logits.dtype == torch.float64 else logits.float()


class FP32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that computes in fp32, whatever the dtype of its input and of its own weights.

    Under autocast (fp16/bf16 with DDP) half-precision batch statistics lose the small variances of late layers;
    under DeepSpeed's fp16/bf16 the engine casts BatchNorm's weights but not its running statistics, and plain
    BatchNorm then fails on the mixed dtypes. Here the statistics stay fp32, the weights are used as fp32 (their
    gradients flow back to whatever dtype they have), and the output returns in the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64):
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        keep = not self.training or self.track_running_stats
        with torch.autocast(x.device.type, enabled=False):
            out = F.batch_norm(
                x.float(), self.running_mean if keep else None, self.running_var if keep else None,
                self.weight.float(), self.bias.float(), use_batch, momentum, self.eps,
            )
        return out.to(x.dtype)


def keep_batchnorm_fp32(model: nn.Module) -> nn.Module:
    """Make every BatchNorm2d an FP32BatchNorm2d in place (same parameters and state dict keys)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = FP32BatchNorm2d
    return model


def needs_fp32_batchnorm(precision: str, deepspeed: bool, requested: bool) -> bool:
    """Under DeepSpeed half precision always (mixed dtypes otherwise); under autocast when `speed.bn_fp32` asks."""
    return precision in HALF and (requested or deepspeed)


def restore_fp32_buffers(model: nn.Module) -> int:
    """Cast 16-bit floating buffers (BatchNorm running statistics) back to fp32; returns how many were cast.

    For DeepSpeed < 0.19.2, whose engine casts the whole module to 16 bit; a no-op on later versions.
    """
    n = 0
    for m in model.modules():
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.dtype in (torch.float16, torch.bfloat16):
                setattr(m, name, b.float())
                n += 1
    return n


def configure_cuda_math(tf32: bool, cudnn_benchmark: bool) -> None:
    """speed.tf32 and speed.cudnn_benchmark (process-wide; nothing to do without CUDA)."""
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
