"""FSDP2 (distributed.strategy=fsdp) trains like DDP, resumes exactly, moves between world sizes through DCP's
resharding, exports the run's weights, and refuses what it does not do in one line. 2 CPU ranks over gloo.

FSDP2 computes in whatever dtype the parameters have, so unlike ZeRO it is compared with DDP in float64, where
the same training agrees to ~1e-17 whatever order the kernels sum in (helpers.FP64_BOUND)."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import (
    DIGITS_RUN,
    EQUIV_ACCUM_CLIP,
    FP64,
    ROOT,
    assert_same_training,
    check,
    error_line,
    flat,
    launch,
    rel,
    summary,
    trains_like_fp32,
    worker_report,
)
from safetensors.torch import load_file

from alexdist.errors import CheckpointError

COMMON = EQUIV_ACCUM_CLIP + FP64
FSDP = ["distributed.strategy=fsdp"]
BN = ["model.name=alexnet_bn", "train.max_steps=4"]
LARS = ["optim.name=lars", "optim.lr=2.0", "optim.trust_coeff=0.01"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir, ddp_fp64):
    """The same 6 steps (2 x 4 per rank, accumulation 2, clipping active) under DDP (conftest.ddp_fp64) and FSDP
    in float64; the BN model under both; FSDP stopped at step 3 and resumed on 2 processes, and the same stop
    moved 2 -> 1 -> 2 processes."""
    root = tmp_path_factory.mktemp("fsdp")
    out = dict(ddp_fp64)
    for name, extra in [("fsdp", FSDP), ("ddp_bn", BN), ("fsdp_bn", FSDP + BN), ("ddp_lars", LARS),
                        ("fsdp_lars", FSDP + LARS), ("fsdp_channels_last", FSDP + ["speed.channels_last=true"])]:
        out[name] = root / name
        check(launch(COMMON + extra + [f"output_dir={out[name]}"], cache_dir, nproc=2))
    # One stop at step 3 (2 processes), resumed twice: on 2 processes to step 6, and on 1 process to step 5 then
    # 2 to step 6. global_batch is fixed, so the 1-process leg accumulates 4 micro-batches.
    resumed, moved = out["resumed"], out["moved"] = root / "resumed", root / "moved"
    stop = COMMON + FSDP + ["train.global_batch=16"]
    check(launch(stop + ["train.max_steps=3", f"output_dir={resumed}"], cache_dir, nproc=2))
    shutil.copytree(resumed, moved)
    check(launch(stop + [f"output_dir={resumed}"], cache_dir, nproc=2))
    for nproc, steps in [(1, 5), (2, 6)]:
        check(launch(stop + [f"train.max_steps={steps}", f"output_dir={moved}"], cache_dir, nproc=nproc))
    return out


def test_fsdp_reaches_the_parameters_of_ddp_with_accumulation_and_clipping(runs):
    ref = flat(runs["ddp"])
    assert rel(ref, flat(runs["ddp_noclip"])) > 1e-6  # clipping changed the updates: agreeing means something
    s = summary(runs["fsdp"])
    assert (s["strategy"], s["world_size"], s["effective_batch"]) == ("fsdp", 2, 16)
    assert s["rank_param_sums"] is None  # ranks hold shards, not whole parameters
    assert_same_training(ref, flat(runs["fsdp"]), "fsdp")  # measured 4.5e-18


def test_fsdp_with_batchnorm_keeps_the_statistics_ddp_saves(runs):
    """DDP broadcasts rank 0's statistics at every forward; FSDP never syncs buffers, so its rank 0 holds the
    same statistics, which the evaluation and the saved weights take (FSDP2Strategy.before_save, loop.evaluate)."""
    ddp, fsdp = flat(runs["ddp_bn"]), flat(runs["fsdp_bn"])  # parameters and statistics
    assert rel(ddp, fsdp) < 1e-12  # measured 1.2e-16
    test = [json.loads(line) for line in (runs["fsdp_bn"] / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (runs["ddp_bn"] / "metrics.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in test if e["event"] == "test"] == pytest.approx(
        [e["loss"] for e in ref if e["event"] == "test"], rel=1e-12)


def test_lars_under_fsdp_reaches_the_parameters_of_ddp(runs):
    # Layer-wise trust ratios need whole-tensor norms: on shards they would be each rank's own, and differ.
    assert_same_training(flat(runs["ddp_lars"]), flat(runs["fsdp_lars"]), "fsdp lars")
    assert rel(flat(runs["ddp_lars"]), flat(runs["ddp"])) > 1e-3  # LARS is not SGD (control)


def test_fsdp_with_channels_last_trains_with_contiguous_parameters_like_without(runs):
    # FSDP2 refuses channels_last parameters: only the inputs are channels_last, the training is the same.
    assert_same_training(flat(runs["fsdp"]), flat(runs["fsdp_channels_last"]), "fsdp channels_last")


def test_fsdp_checkpoints_are_dcp_shards_written_by_every_rank(runs):
    ckpt = sorted((runs["fsdp"] / "checkpoints").glob("step-*"))[-1]
    files = {p.name for p in (ckpt / "dcp").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= files
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.bin").exists()


def test_fsdp_stop_and_resume_is_bit_identical(runs):
    assert summary(runs["resumed"])["resumed_at_step"] == 3
    assert torch.equal(flat(runs["fsdp"]), flat(runs["resumed"]))


def test_fsdp_moves_from_2_to_1_to_2_processes_with_its_optimizer_state(runs):
    """DCP reshards on load, the momentum included: the run equals the uninterrupted one in float64."""
    assert summary(runs["moved"])["resumed_at_step"] == 5
    assert_same_training(flat(runs["fsdp"]), flat(runs["moved"]), "fsdp 2 -> 1 -> 2")  # measured 2.6e-18


def test_export_of_an_fsdp_checkpoint_is_the_runs_final_weights(runs, tmp_path):
    ckpt = sorted((runs["fsdp"] / "checkpoints").glob("step-*"))[-1]
    out = tmp_path / "fsdp.safetensors"
    proc = subprocess.run([sys.executable, "-m", "alexdist", "export", str(ckpt), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    exported, final = load_file(str(out)), load_file(str(runs["fsdp"] / "model.safetensors"))
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)


def test_gradients_are_reduce_scattered_only_on_the_last_micro_batch():
    report = worker_report("fsdp_worker.py")
    assert report["sharded"]
    assert report["grads_after_micro"] == [False, True]  # no reduce-scatter (no sharded gradient) before the last
    assert report["norm"] == pytest.approx(report["plain_norm"], rel=1e-12)  # the norm over shards is the whole's


@pytest.mark.parametrize("trust_clip", ["false", "true"])
def test_lars_on_sharded_parameters_is_unsharded_lars_with_one_all_reduce_per_step(trust_clip):
    """timm's LARS took each DTensor norm with a collective of its own: 75 tiny all-reduces per step for
    alexnet_bn (CommDebugMode, 2 CPU ranks), each a latency-bound NCCL call on GPUs. ShardedLars sums every
    tensor's local squared norms in one all-reduce; float64 weights after 3 steps equal timm's unsharded LARS to
    rounding (measured 1e-14 after the weights moved by ~1)."""
    r = worker_report("lars_worker.py", trust_clip)
    print(f"\ntrust_clip={trust_clip}: {r}")
    assert r["optimizer"] == "ShardedLars" and r["allreduces_per_step"] == [1, 1, 1]
    assert r["max_diff"] < 1e-10 and r["travel"] > 0.1


@pytest.mark.learned
def test_fsdp_in_bf16_trains_batchnorm_like_fp32(tmp_path, cache_dir, accuracy_band, untrained_control):
    run = tmp_path / "bf16"  # 2 processes x 16: DIGITS_RUN's effective batch
    check(launch(DIGITS_RUN + FSDP + ["precision=bf16", "train.batch_size=16", f"output_dir={run}"], cache_dir,
                 nproc=2))
    weights = load_file(str(run / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())  # fp32 masters, fp32 statistics
    trains_like_fp32(accuracy_band, run, untrained_control)


def test_the_accelerate_fsdp_config_selects_fsdp_and_a_conflicting_recipe_is_refused(tmp_path, cache_dir):
    small = ["model.width_mult=0.25", "train.max_steps=2", "data.source=synthetic", "data.synthetic_train=256",
             "data.synthetic_test=64", "tracking.wandb=false"]
    run = tmp_path / "cfg"
    check(launch(small + [f"output_dir={run}"], cache_dir, nproc=2, config_file="recipes/accelerate/fsdp.yaml"))
    assert summary(run)["strategy"] == "fsdp"
    proc = launch(small + ["distributed.strategy=ddp", f"output_dir={tmp_path / 'x'}"], cache_dir, nproc=2,
                  config_file="recipes/accelerate/fsdp.yaml")
    assert "the launcher config says FSDP but the recipe says distributed.strategy=ddp" in error_line(proc)
    proc = launch(small + FSDP + ["speed.compile=true", f"output_dir={tmp_path / 'y'}"], cache_dir, nproc=2)
    assert "speed.compile is not supported with distributed.strategy=fsdp" in error_line(proc)


def test_a_crafted_dcp_metadata_is_refused_without_running_it(tmp_path, runs):
    from alexdist.distributed.dcp import check_dcp_metadata

    good = sorted((runs["fsdp"] / "checkpoints").glob("step-*"))[-1] / "dcp"
    check_dcp_metadata(good)  # a real run's metadata passes
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    bad = tmp_path / "dcp"
    bad.mkdir()
    (bad / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="would import posix.system"):
        check_dcp_metadata(bad)
    assert not marker.exists()
