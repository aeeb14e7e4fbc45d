"""Speed options applied to the model and the Accelerator (recipe section `speed`, see config.SpeedConfig)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alexdist.config import Recipe


class FP32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that computes in fp32, whatever the dtype of its input and of its own weights.

    Under autocast (fp16/bf16 with DDP) half-precision batch statistics lose the small variances of late layers;
    under DeepSpeed's fp16/bf16 the engine casts BatchNorm's weights but not its running statistics, and plain
    BatchNorm then fails on the mixed dtypes. Here the statistics stay fp32, the weights are used as fp32 (their
    gradients flow back to whatever dtype they have), and the output returns in the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
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


def apply_to_model(model: nn.Module, recipe: Recipe, deepspeed: bool) -> nn.Module:
    """Before accelerator.prepare: memory layout and BatchNorm precision. Under DeepSpeed in fp16/bf16 BatchNorm
    always computes in fp32 (see FP32BatchNorm2d: the engine casts weights, not statistics)."""
    if recipe.speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if recipe.precision in ("fp16", "bf16") and (recipe.speed.bn_fp32 or deepspeed):
        keep_batchnorm_fp32(model)
    return model


def dynamo_plugin(recipe: Recipe):
    """Accelerate's TorchDynamoPlugin for speed.compile (None: no compilation, whatever the launcher's env says)."""
    from accelerate.utils import TorchDynamoPlugin

    return TorchDynamoPlugin(backend="inductor" if recipe.speed.compile else "no")


def to_device(t: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch built on the host (speed.data_on_device=false) to the device: from pinned memory, not blocking, so
    the copy overlaps the previous step's kernels. A no-op for batches already on the device."""
    if t.device != device:
        if device.type == "cuda":
            t = t.pin_memory()
        t = t.to(device, non_blocking=True)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t
