"""Numerics training relies on (training/precision.py, models.FP32BatchNorm2d and each strategy's dtype), unit
level: the dtype each precision computes in,
BatchNorm statistics kept in fp32 whatever DeepSpeed version cast them, the loss's input dtype, CUDA's math
switches."""

import pytest
import torch

from alexdist.distributed.strategies import strategy_named
from alexdist.models import FP32BatchNorm2d, build_model, keep_batchnorm_fp32, restore_fp32_buffers
from alexdist.training.precision import configure_cuda_math, loss_input


@pytest.mark.parametrize("precision, deepspeed, dtype", [
    ("no", False, torch.float32), ("bf16", False, torch.float32), ("fp16", False, torch.float32),  # autocast
    ("bf16", True, torch.bfloat16), ("fp16", True, torch.float16), ("no", True, torch.float32),
    ("fp64", False, torch.float64),
])
def test_inputs_are_cast_only_where_no_autocast_does_it(precision, deepspeed, dtype):
    assert strategy_named("deepspeed" if deepspeed else "ddp").compute_dtype(precision) == dtype


def test_fp32_batchnorm_under_deepspeed_half_precision_always_and_under_autocast_on_request():
    deepspeed, ddp = strategy_named("deepspeed"), strategy_named("ddp")
    assert deepspeed.fp32_batchnorm("bf16", requested=False)
    assert not ddp.fp32_batchnorm("bf16", requested=False)
    assert ddp.fp32_batchnorm("fp16", requested=True)
    assert not deepspeed.fp32_batchnorm("no", requested=True)


def test_statistics_cast_to_16_bit_by_an_old_deepspeed_are_restored_and_the_model_runs():
    """DeepSpeed < 0.19.2 casts the whole module (`module.half()`): BatchNorm's running statistics become fp16
    and FP32BatchNorm2d would meet mixed dtypes. After restore_fp32_buffers they are fp32 again."""
    model = keep_batchnorm_fp32(build_model("alexnet_bn", 32, width_mult=0.25)).half()  # what 0.19.1 does
    bns = [m for m in model.modules() if isinstance(m, FP32BatchNorm2d)]
    assert bns and all(m.running_mean.dtype == torch.float16 for m in bns)
    assert restore_fp32_buffers(model) == 2 * len(bns)  # running mean and var; the int counter is untouched
    assert all(m.running_mean.dtype == m.running_var.dtype == torch.float32 for m in bns)
    assert all(p.dtype == torch.float16 for p in model.parameters())  # parameters stay as the engine made them
    out = model(torch.randn(4, 3, 32, 32).half())
    assert out.dtype == torch.float16 and torch.isfinite(out.float()).all()
    assert restore_fp32_buffers(model) == 0  # DeepSpeed >= 0.19.2: nothing to do


def test_the_loss_sees_fp32_logits_or_fp64_under_precision_fp64():
    assert loss_input(torch.zeros(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert loss_input(torch.zeros(2, dtype=torch.float64)).dtype == torch.float64


def test_cuda_math_switches_follow_the_speed_keys(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        configure_cuda_math(tf32=True, cudnn_benchmark=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
        configure_cuda_math(tf32=False, cudnn_benchmark=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = before
