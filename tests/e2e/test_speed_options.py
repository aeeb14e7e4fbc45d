"""Speed options leave the training the same: each run is compared with the same run without the option.

The options that only change how the same arithmetic is ordered (memory layout, optimizer kernels, compilation,
where batches are built, evaluation batching) are compared in float64, where that order costs ~1e-16 and a
different computation would show by many orders of magnitude more (helpers.FP64_BOUND). bf16 is compared with
fp32 on real digits trained to a converged accuracy (helpers.DIGITS_RUN), in points of test accuracy, within a
tolerance measured from fp32 runs with other seeds in the same session (helpers.AccuracyBand); a run that does
not train (lr 1e-6, the control) must miss by more than 5 tolerances. bf16's own kernels (emulated on AVX2,
native with AMX or AVX-512 BF16, tensor cores on GPUs) land anywhere inside seed noise: measured on the 2-core
AMD EPYC (emulated), bf16 97.2 % and bf16 with fp32 BatchNorm 97.5 % against fp32 seeds at 96.9-98.1 %; the
control 10 %, over 20 tolerances away."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import DIGITS_RUN, FP64, FP64_BOUND, check, flat, launch, read_jsonl, summary, trains_like_fp32
from safetensors.torch import load_file

# alexnet_3x3 on random images without padding: BatchNorm on noise and zero-padded borders (max-pool ties) turn
# last-bit differences into visible ones within a few steps; here they stay at the last bits.
RUN = ["model.name=alexnet_3x3", "augment.crop_padding=0", "schedule.warmup_frac=0", "data.source=synthetic",
       "data.synthetic_train=256", "data.synthetic_test=200", "train.epochs=1",
       "train.batch_size=32", "tracking.wandb=false", "train.log_every=1", "model.width_mult=0.25",
       "model.dropout=0", "optim.lr=0.02"]
VARIANTS = {
    "base": FP64,
    "channels_last": FP64 + ["speed.channels_last=true"],
    "host_data": FP64 + ["speed.data_on_device=false"],
    "foreach": FP64 + ["speed.optimizer_impl=foreach"],
    "for_loop": FP64 + ["speed.optimizer_impl=for_loop"],
    "eval_batch_7": FP64 + ["train.eval_batch_size=7"],
    "compile": FP64 + ["speed.compile=true"],
}
BF16 = {"bf16": ["precision=bf16", "speed.bn_fp32=false"], "bf16_bn_fp32": ["precision=bf16", "speed.bn_fp32=true"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("speed")

    def one(item):
        name, args = item
        check(launch(args + [f"output_dir={root / name}"], cache_dir, timeout=900))
        return name, root / name

    todo = {**{n: RUN + e for n, e in VARIANTS.items()}, **{n: DIGITS_RUN + e for n, e in BF16.items()}}
    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, todo.items()))


def _losses(run):
    return [e["loss"] for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "step"]


def _max_rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name,tol", [("channels_last", FP64_BOUND), ("host_data", 0.0), ("foreach", FP64_BOUND),
                                      ("for_loop", FP64_BOUND), ("compile", FP64_BOUND)])
def test_option_trains_like_the_run_without_it(runs, name, tol):
    assert len(_losses(runs["base"])) == 8
    assert _max_rel(_losses(runs[name]), _losses(runs["base"])) <= tol


def test_compiled_run_saves_the_same_weight_names(runs):
    assert load_file(str(runs["compile"] / "model.safetensors")).keys() == load_file(
        str(runs["base"] / "model.safetensors")).keys()


def test_evaluation_batch_size_does_not_change_the_result(runs):
    a, b = summary(runs["eval_batch_7"]), summary(runs["base"])
    assert a["final_test_acc"] == b["final_test_acc"]
    assert a["final_test_loss"] == pytest.approx(b["final_test_loss"], rel=FP64_BOUND)


@pytest.mark.learned
@pytest.mark.parametrize("name", BF16)
def test_bf16_with_and_without_fp32_batchnorm_trains_like_fp32(runs, name, accuracy_band, untrained_control):
    trains_like_fp32(accuracy_band, runs[name], untrained_control)


@pytest.fixture(scope="module")
def zero2_bf16(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("zero2-bf16") / "run"
    extra = ["precision=bf16", "train.batch_size=16"]  # 2 processes x 16: DIGITS_RUN's effective batch of 32
    check(launch(DIGITS_RUN + extra + [f"output_dir={out}"], cache_dir, nproc=2,
                 config_file="recipes/accelerate/zero2.yaml"))
    return out


@pytest.mark.learned
def test_deepspeed_bf16_trains_the_batchnorm_model_like_fp32(zero2_bf16, accuracy_band, untrained_control):
    out = zero2_bf16
    assert summary(out)["strategy"] == "deepspeed" and summary(out)["effective_batch"] == 32
    trains_like_fp32(accuracy_band, out, untrained_control)


def test_deepspeed_bf16_final_weights_are_the_fp32_master_weights(zero2_bf16, tmp_path):
    """The module holds bf16 copies; the final weights file must hold what `alexdist export` takes from the
    checkpoint: DeepSpeed's fp32 master weights (and fp32 BatchNorm statistics)."""
    import subprocess
    import sys

    from helpers import ROOT

    ckpt = sorted((zero2_bf16 / "checkpoints").glob("step-*"))[-1]  # where the run ended
    exported = tmp_path / "exported"
    exported.mkdir()
    proc = subprocess.run([sys.executable, "-m", "alexdist", "export", str(ckpt), str(exported / "model.safetensors")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    final = load_file(str(zero2_bf16 / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in final.values())
    assert torch.equal(flat(zero2_bf16), flat(exported))
    as_bf16 = torch.cat([final[k].bfloat16().double().flatten() for k in sorted(final)])
    assert not torch.equal(as_bf16, flat(zero2_bf16))  # more than bf16 holds: really the fp32 masters
