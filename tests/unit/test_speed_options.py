"""fp32 BatchNorm under bf16 (speed.bn_fp32): its statistics stay in fp32 under autocast, and it runs on the half
weights DeepSpeed leaves it with. (Whole runs with each speed option against the run without it:
tests/e2e/test_speed_options.py.)"""

from __future__ import annotations

import torch

from alexdist.models import FP32BatchNorm2d, keep_batchnorm_fp32


def test_fp32_batchnorm_keeps_statistics_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5) * 3 + 1
    bn = keep_batchnorm_fp32(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))[0]
    assert isinstance(bn, FP32BatchNorm2d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x.bfloat16())
    assert y.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    # The statistics of the fp32 computation on the same (bf16-rounded) input.
    torch.testing.assert_close(bn.running_var, _stats_of(x.bfloat16().float()), rtol=1e-6, atol=1e-6)


def _stats_of(x):
    bn = torch.nn.BatchNorm2d(4)
    bn(x)
    return bn.running_var


def test_fp32_batchnorm_runs_with_half_weights_and_fp32_statistics_as_deepspeed_leaves_them():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5)
    ref = torch.nn.BatchNorm2d(4)
    want = ref(x.bfloat16().float())
    bn = keep_batchnorm_fp32(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))[0]
    bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()  # DeepSpeed's cast
    y = bn(x.bfloat16())
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and bn.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(bn.running_var, ref.running_var)


