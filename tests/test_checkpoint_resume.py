"""DeepSpeed ZeRO vs DDP, exact resume, world-size changes, export/evaluate, checkpoint rotation.

Every run goes through a real launcher with 2 CPU ranks (gloo), as a user would start it.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, check, comparable_events, launch, read_jsonl, summary
from safetensors.torch import load_file
from test_training import EQUIV, _flat, _rel, assert_same_training

pytestmark = pytest.mark.slow

# BN + dropout + augmentation: the resume test must also restore RNG state, BN statistics and momentum.
QUICK = ["tracking.wandb=false", "train.log_every=5", "checkpoint.every_steps=8"]
def _error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("alexdist: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, cache_dir):
    """The same 6 steps under DDP and ZeRO-1/2/3 (ZeRO-3 through Accelerate's config-file path), with gradient
    accumulation (2 x 4 per rank) and clipping active."""
    root = tmp_path_factory.mktemp("zero")
    common = EQUIV + ["train.batch_size=4", "train.grad_accum=2", "train.grad_clip=0.2"]
    runs = {}
    for name, extra, launch_args in [
        ("ddp", [], {}),
        ("ddp_noclip", ["train.grad_clip=null"], {}),
        ("zero1", ["distributed.strategy=deepspeed", "distributed.zero_stage=1"], {}),
        ("zero2", ["distributed.strategy=deepspeed", "distributed.zero_stage=2"], {}),
        ("zero3", [], {"config_file": "recipes/accelerate/zero3.yaml"}),
    ]:
        out = root / name
        check(launch(common + [f"output_dir={out}"] + extra, cache_dir, nproc=2, **launch_args))
        runs[name] = out
    return runs


def test_zero_stages_reach_the_same_parameters_as_ddp_with_accumulation_and_clipping(zero_runs):
    ref = _flat(zero_runs["ddp"])
    noclip = _flat(zero_runs["ddp_noclip"])
    assert _rel(ref, noclip) > 1e-6  # clipping changed the updates, so agreeing on it means something
    for name in ("zero1", "zero2", "zero3"):
        s = summary(zero_runs[name])
        assert s["strategy"] == "deepspeed" and s["world_size"] == 2 and s["distributed_type"] == "DistributedType.DEEPSPEED"
        assert s["zero_stage"] == int(name[-1]) and s["effective_batch"] == 16
        assert_same_training(ref, _flat(zero_runs[name]), name)


def test_zero_checkpoints_hold_deepspeed_partitions_per_rank(zero_runs):
    ckpt = sorted((zero_runs["zero2"] / "checkpoints").glob("step-*"))[-1]
    files = {p.name for p in (ckpt / "pytorch_model").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()


def test_export_and_evaluate_agree_with_the_logged_accuracy_for_ddp_and_zero3(zero_runs, tmp_path):
    for name in ("ddp", "zero3"):
        run = zero_runs[name]
        ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
        out = tmp_path / f"{name}.safetensors"
        proc = subprocess.run([sys.executable, "-m", "alexdist.export", str(ckpt), str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        with open(out, "rb") as fh:  # safetensors: a JSON header, then raw tensors -- nothing to unpickle
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        assert header["__metadata__"]["model"] == "alexnet_3x3" and header["__metadata__"]["input_size"] == "32"
        exported = load_file(str(out))
        assert torch.equal(torch.cat([exported[k].flatten() for k in sorted(exported)]).double(), _flat(run))

        def evaluate(target):
            p = subprocess.run([sys.executable, "-m", "alexdist.evaluate", str(target), "--json"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stderr
            return json.loads(p.stdout.strip().splitlines()[-1])

        from_file, from_ckpt = evaluate(out), evaluate(ckpt)
        assert from_file == from_ckpt
        logged = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"][-1]
        assert from_file["test_acc"] == logged["acc"]
        assert from_file["test_loss"] == pytest.approx(logged["loss"], rel=1e-5)


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
    zero2 = ["distributed.strategy=deepspeed", "distributed.zero_stage=2"]
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    check(launch(QUICK + zero2 + ["train.max_steps=26", f"output_dir={whole}"], cache_dir, nproc=2))
    check(launch(QUICK + zero2 + ["train.max_steps=11", f"output_dir={pieces}"], cache_dir, nproc=2))
    check(launch(QUICK + zero2 + ["train.max_steps=26", f"output_dir={pieces}"], cache_dir, nproc=2))
    a, b = _flat(whole), _flat(pieces)
    assert ((a - b).norm() / a.norm()).item() < 1e-6
    ea, eb = comparable_events(whole), comparable_events(pieces)
    assert [(e["event"], e["step"]) for e in ea] == [(e["event"], e["step"]) for e in eb]
    for x, y in zip(ea, eb):
        for key in ("loss", "acc", "lr"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x, y)


def test_ddp_resumes_across_world_sizes_2_1_2_with_the_global_batch_kept(tmp_path, cache_dir):
    base = [a for a in EQUIV if not a.startswith("train.max_steps")] + ["train.global_batch=16"]
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    check(launch(base + ["train.max_steps=12", f"output_dir={whole}"], cache_dir, nproc=2))
    check(launch(base + ["train.max_steps=4", f"output_dir={moved}"], cache_dir, nproc=2))
    check(launch(base + ["train.max_steps=8", f"output_dir={moved}"], cache_dir, nproc=1))
    s = summary(moved)
    assert s["world_size"] == 1 and s["batch_size_per_process"] == 16 and s["resumed_at_step"] == 4
    check(launch(base + ["train.max_steps=12", f"output_dir={moved}"], cache_dir, nproc=2))
    s = summary(moved)
    assert s["world_size"] == 2 and s["batch_size_per_process"] == 8 and s["resumed_at_step"] == 8
    assert_same_training(_flat(whole), _flat(moved), "2 -> 1 -> 2 processes")

    # Without the global batch held, the data position and schedule would not carry over: refused, with the fix.
    plain = [a for a in base if not a.startswith("train.global_batch")] + ["train.batch_size=8", "train.max_steps=14"]
    proc = launch(plain + [f"output_dir={moved}"], cache_dir, nproc=1)
    assert proc.returncode == 2
    assert "set train.global_batch=16" in _error_line(proc)


def test_zero_checkpoint_on_another_world_size_stops_with_how_to_convert(zero_runs, tmp_path, cache_dir):
    import shutil

    run = tmp_path / "zero2-moved"
    shutil.copytree(zero_runs["zero2"], run)
    proc = launch(EQUIV + ["train.batch_size=8", "train.grad_accum=2", "distributed.strategy=deepspeed", "distributed.zero_stage=2",
                           "train.max_steps=8", f"output_dir={run}"], cache_dir, nproc=1, launcher="torchrun")
    assert proc.returncode != 0  # torchrun reports a failed worker as 1; the worker itself exits 4
    line = _error_line(proc)
    assert "for 2 processes, this run has 1" in line and "python -m alexdist.export" in line


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
