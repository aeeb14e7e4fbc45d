"""A run continues exactly where it stopped: DDP bit for bit (weights, BN statistics, RNG, data position, W&B
run), ZeRO-2 within fp32 rounding, and checkpoint rotation keeps what resume needs.

Every run goes through a real launcher with 2 CPU ranks (gloo), as a user would start it."""

import pytest
import torch
from conftest import check, comparable_events, launch, read_jsonl, summary
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# BN + dropout + augmentation: the resume test must also restore RNG state, BN statistics and momentum.
QUICK = ["tracking.wandb=false", "train.log_every=5", "checkpoint.every_steps=8"]


def test_ddp_resume_is_bit_identical_to_the_uninterrupted_run(tmp_path, cache_dir):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    quick = [a for a in QUICK if not a.startswith("tracking.")]  # W&B offline on: the run must continue too
    check(launch(quick + ["train.max_steps=30", f"output_dir={whole}"], cache_dir, nproc=2))
    check(launch(quick + ["train.max_steps=13", f"output_dir={pieces}"], cache_dir, nproc=2))  # mid-epoch 1
    assert (pieces / "checkpoints" / "step-0000013").is_dir()
    first_id = summary(pieces)["wandb_run_id"]
    proc = check(launch(quick + ["train.max_steps=30", f"output_dir={pieces}"], cache_dir, nproc=2))
    assert "resumed from" in proc.stdout and "step-0000013 at step 13" in proc.stdout
    assert first_id and summary(pieces)["wandb_run_id"] == first_id  # the same W&B run continues
    assert {p.name.rsplit("-", 1)[-1] for p in (pieces / "wandb").glob("offline-run-*")} == {first_id}
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(pieces / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BN buffers included
    assert comparable_events(pieces) == comparable_events(whole)  # same losses, accuracies and lr at every logged step


def test_zero2_resume_matches_the_uninterrupted_run(tmp_path, cache_dir):
    """ZeRO-2 resumes its fp32 master weights, optimizer partitions, RNG and data position exactly: the parameters
    and every training loss are bit-identical. BatchNorm statistics are not part of ZeRO's partitions: each rank
    keeps its own and they are averaged before each evaluation, so the resumed run (whose ranks start from the
    saved average) agrees only up to the rounding of those averages. They never feed back into training
    (training uses batch statistics), so that rounding does not grow: a few fp32 ulps."""
    zero2 = ["distributed.strategy=deepspeed", "distributed.zero_stage=2"]
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    check(launch(QUICK + zero2 + ["train.max_steps=26", f"output_dir={whole}"], cache_dir, nproc=2))
    check(launch(QUICK + zero2 + ["train.max_steps=11", f"output_dir={pieces}"], cache_dir, nproc=2))
    check(launch(QUICK + zero2 + ["train.max_steps=26", f"output_dir={pieces}"], cache_dir, nproc=2))
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(pieces / "model.safetensors"))
    stats = {k for k in a if k.endswith(("running_mean", "running_var"))}
    assert stats and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a.keys() - stats)  # parameters: bit for bit
    ulps = 64 * torch.finfo(torch.float32).eps
    for k in stats:
        assert ((a[k] - b[k]).abs() <= ulps * a[k].abs().clamp_min(1e-3)).all(), k
    ea, eb = comparable_events(whole), comparable_events(pieces)
    assert [(e["event"], e["step"]) for e in ea] == [(e["event"], e["step"]) for e in eb]
    n_test = 359  # digits' test split
    for x, y in zip(ea, eb, strict=True):
        if x["event"] != "test":
            assert x == y  # every training loss, accuracy and lr exactly
        else:  # one forward pass with statistics that differ in their last bits: nothing amplifies it
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x, y)
            assert abs(y["acc"] - x["acc"]) <= 1 / n_test + 1e-12, (x, y)  # a near-tie may flip one image


def test_rotation_keeps_the_newest_and_the_best_and_resume_skips_incomplete_directories(tmp_path, cache_dir):
    run = tmp_path / "rot"
    args = ["tracking.wandb=false", "train.epochs=3", "checkpoint.every_steps=10", "checkpoint.keep=2",
            "train.log_every=0", f"output_dir={run}"]
    check(launch(args, cache_dir))
    tests = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"]
    best_step = max(tests, key=lambda e: (e["acc"], e["step"]))["step"]
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    steps_written = sorted({*range(10, 133, 10), 44, 88, 132})
    expected = {f"step-{s:07d}" for s in steps_written[-2:]} | {f"step-{best_step:07d}"}
    assert set(kept) == expected

    # A crash mid-save leaves a .tmp-* directory; a step-* without trainer_state.json is not complete either.
    (run / "checkpoints" / ".tmp-step-0000999").mkdir()
    (run / "checkpoints" / "step-0000998").mkdir()
    proc = check(launch(args + ["train.epochs=4"], cache_dir))
    assert "step-0000132 at step 132" in proc.stdout
    assert not (run / "checkpoints" / ".tmp-step-0000999").exists()  # removed by the next save
    assert summary(run)["steps"] == 176
