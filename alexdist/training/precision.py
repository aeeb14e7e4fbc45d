"""Numerics that training relies on, whatever the speed options: the dtype the loss sees, and CUDA's math
switches. The dtype the model computes in is the strategy's (Strategy.compute_dtype), and BatchNorm in fp32
under half precision is models.FP32BatchNorm2d.

Who casts what, per `precision`:
- `no`: fp32 everywhere.
- `fp64`: model and inputs in float64 (a debug precision: the equivalence tests prove the distributed semantics
  in it, where fp32 kernels' summation order cannot hide or fake a difference).
- `fp16`/`bf16` under DDP: Accelerate's autocast; weights, gradients and optimizer state stay fp32.
- `fp16`/`bf16` under DeepSpeed: the engine casts the module's parameters to 16 bit and runs no autocast, so
  inputs are cast by hand (`compute_dtype`). DeepSpeed < 0.19.2 casts the buffers too (`module.half()`, checked
  in the 0.19.1 sdist's engine.py; 0.19.2 casts parameters only, DeepSpeed #8066): `models.restore_fp32_buffers` casts
  BatchNorm's running statistics back, so every supported version trains the same.
"""

from __future__ import annotations

import torch


def loss_input(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the loss sees them: fp32 (or fp64 under precision=fp64; a cast to fp32 would round its
    gradients to fp32 too)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def configure_cuda_math(tf32: bool, cudnn_benchmark: bool) -> None:
    """speed.tf32 and speed.cudnn_benchmark (process-wide; nothing to do without CUDA)."""
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
