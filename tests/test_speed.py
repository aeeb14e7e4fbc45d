"""Speed options leave the training the same: each run is compared with the same run without the option."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import check, launch, read_jsonl, summary
from safetensors.torch import load_file

from alexdist.speed import FP32BatchNorm2d, keep_batchnorm_fp32

# alexnet_3x3 on random images without padding: BatchNorm on noise and zero-padded borders (max-pool ties) turn
# last-bit differences into visible ones within a few steps; here they stay at the last bits.
RUN = ["model.name=alexnet_3x3", "augment.crop_padding=0", "schedule.warmup_frac=0", "data.source=synthetic", "data.synthetic_train=256", "data.synthetic_test=200", "train.epochs=1",
       "train.batch_size=32", "tracking.wandb=false", "train.log_every=1", "model.width_mult=0.25",
       "model.dropout=0", "optim.lr=0.02"]
VARIANTS = {
    "base": [],
    "channels_last": ["speed.channels_last=true"],
    "host_data": ["speed.data_on_device=false"],
    "foreach": ["speed.optimizer_impl=foreach"],
    "for_loop": ["speed.optimizer_impl=for_loop"],
    "eval_batch_7": ["train.eval_batch_size=7"],
    "compile": ["speed.compile=true"],
    "bf16": ["model.name=alexnet_bn", "precision=bf16", "train.max_steps=3", "speed.bn_fp32=false"],
    "bf16_bn_fp32": ["model.name=alexnet_bn", "precision=bf16", "train.max_steps=3", "speed.bn_fp32=true"],
    "fp32_3": ["model.name=alexnet_bn", "train.max_steps=3"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("speed")

    def one(item):
        name, extra = item
        check(launch(RUN + extra + [f"output_dir={root / name}"], cache_dir, timeout=900))
        return name, root / name

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, VARIANTS.items()))


def _losses(run):
    return [e["loss"] for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "step"]


def _max_rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name,tol", [("channels_last", 1e-5), ("host_data", 0.0), ("foreach", 1e-5),
                                      ("for_loop", 1e-5), ("compile", 1e-5)])
def test_option_trains_like_the_run_without_it(runs, name, tol):
    assert len(_losses(runs["base"])) == 8
    assert _max_rel(_losses(runs[name]), _losses(runs["base"])) <= tol


@pytest.mark.slow
def test_compiled_run_saves_the_same_weight_names(runs):
    assert load_file(str(runs["compile"] / "model.safetensors")).keys() == load_file(
        str(runs["base"] / "model.safetensors")).keys()


@pytest.mark.slow
def test_evaluation_batch_size_does_not_change_the_result(runs):
    a, b = summary(runs["eval_batch_7"]), summary(runs["base"])
    assert a["final_test_acc"] == b["final_test_acc"]
    assert a["final_test_loss"] == pytest.approx(b["final_test_loss"], rel=1e-5)


@pytest.mark.slow
def test_bf16_with_and_without_fp32_batchnorm_stays_close_to_fp32(runs):
    fp32 = _losses(runs["fp32_3"])
    assert _max_rel(_losses(runs["bf16_bn_fp32"]), fp32) < 0.05
    assert _max_rel(_losses(runs["bf16"]), fp32) < 0.05


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


@pytest.mark.slow
def test_deepspeed_bf16_trains_the_batchnorm_model_like_fp32(runs, tmp_path, cache_dir):
    out = tmp_path / "zero2-bf16"
    extra = ["model.name=alexnet_bn", "precision=bf16", "train.max_steps=3", "train.batch_size=16"]
    check(launch(RUN + extra + [f"output_dir={out}"], cache_dir, nproc=2, config_file="recipes/accelerate/zero2.yaml"))
    assert summary(out)["strategy"] == "deepspeed" and summary(out)["effective_batch"] == 32
    assert _max_rel(_losses(out), _losses(runs["fp32_3"])) < 0.05
