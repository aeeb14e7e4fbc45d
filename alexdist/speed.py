"""Speed options applied to the model and the Accelerator (recipe section `speed`, see config.SpeedConfig)."""

from __future__ import annotations

import torch
from torch import nn

from alexdist.config import Recipe


class FP32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that computes (and keeps its statistics) in fp32 under autocast, whatever its input dtype.

    Half-precision batch statistics lose the small variances of late layers; the conv after it is autocast
    back to half anyway, so this costs one cast each way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:  # fp32 training, or DeepSpeed's cast module: nothing to do
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def keep_batchnorm_fp32(model: nn.Module) -> nn.Module:
    """Make every BatchNorm2d an FP32BatchNorm2d in place (same parameters and state dict keys)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = FP32BatchNorm2d
    return model


def apply_to_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Before accelerator.prepare: memory layout and BatchNorm precision."""
    if recipe.speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if recipe.speed.bn_fp32 and recipe.precision in ("fp16", "bf16"):
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
