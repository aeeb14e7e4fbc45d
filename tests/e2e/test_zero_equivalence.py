"""DeepSpeed ZeRO-1/2/3 train like DDP, keep their partitions per rank, export and evaluate like DDP, and refuse
a world size their partitions were not made for. Every run goes through a real launcher with 2 CPU ranks.

DeepSpeed computes in fp32 at most (asked for float64 it still reduces in fp32), so ZeRO is compared with DDP in
fp32, within a bound derived on this machine: a few times the distance between the DDP run and the same run in
float64 (helpers.fp32_bound)."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    EQUIV,
    EQUIV_ACCUM_CLIP,
    ROOT,
    assert_same_training,
    check,
    error_line,
    flat,
    fp32_bound,
    launch,
    read_jsonl,
    rel,
    run_env,
    summary,
)
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, cache_dir, ddp_fp64):
    """The same 6 steps under DDP (fp32; float64 with and without clipping: conftest.ddp_fp64) and ZeRO-1/2/3
    (ZeRO-3 through Accelerate's config-file path), with gradient accumulation (2 x 4 per rank) and clipping
    active."""
    root = tmp_path_factory.mktemp("zero")
    runs = {"ddp_fp64": ddp_fp64["ddp"], "ddp_fp64_noclip": ddp_fp64["ddp_noclip"]}
    for name, extra, launch_args in [
        ("ddp", [], {}),
        ("zero1", ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=1"], {}),
        ("zero2", ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"], {}),
        ("zero2_no_momentum", ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2",
                               "optim.momentum=0"], {}),
        ("zero3", [], {"config_file": "recipes/accelerate/zero3.yaml"}),
    ]:
        out = root / name
        check(launch(EQUIV_ACCUM_CLIP + [f"output_dir={out}"] + extra, cache_dir, nproc=2, **launch_args))
        runs[name] = out
    return runs


def test_zero_stages_reach_the_same_parameters_as_ddp_with_accumulation_and_clipping(zero_runs):
    ref, exact = flat(zero_runs["ddp"]), flat(zero_runs["ddp_fp64"])
    bound = fp32_bound(ref, exact)  # 3 x 1.6e-6 on the Intel machine; ZeRO vs DDP measured 2.7e-9 there
    # Clipping changed the updates far beyond rounding: agreeing means something. The control runs in float64;
    # ref's own distance from float64 is bound / 3, so the clipping alone must still make > 29 bounds.
    noclip = flat(zero_runs["ddp_fp64_noclip"])
    assert rel(ref, noclip) > 30 * bound
    for name in ("zero1", "zero2", "zero3"):
        s = summary(zero_runs[name])
        assert s["strategy"] == "deepspeed" and s["world_size"] == 2
        assert s["distributed_type"] == "DistributedType.DEEPSPEED"
        assert s["zero_stage"] == int(name[-1]) and s["effective_batch"] == 16
        assert_same_training(ref, flat(zero_runs[name]), name, bound=bound)
        assert rel(exact, flat(zero_runs[name])) < bound  # and as close to the exact training as DDP's fp32 is


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
        proc = subprocess.run([sys.executable, "-m", "alexdist", "export", str(ckpt), str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        with open(out, "rb") as fh:  # safetensors: a JSON header, then raw tensors -- nothing to unpickle
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        assert header["__metadata__"]["model"] == "alexnet_3x3" and header["__metadata__"]["input_size"] == "32"
        exported = load_file(str(out))
        assert torch.equal(torch.cat([exported[k].flatten() for k in sorted(exported)]).double(), flat(run))

        def evaluate(target):
            p = subprocess.run([sys.executable, "-m", "alexdist", "evaluate", str(target), "--json"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300, check=False)
            assert p.returncode == 0, p.stderr
            return json.loads(p.stdout.strip().splitlines()[-1])

        from_file, from_ckpt = evaluate(out), evaluate(ckpt)
        assert from_file == from_ckpt
        logged = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"][-1]
        assert from_file["test_acc"] == logged["acc"]
        # One fp32 forward pass over other batch compositions (1 process vs 2): rounding of a single pass, no
        # training to amplify it (~1e-7 relative); 1e-5 leaves a wide margin and still catches other weights.
        assert from_file["test_loss"] == pytest.approx(logged["loss"], rel=1e-5)


def test_a_zero2_sgd_run_moves_from_2_to_1_to_2_processes_with_its_momentum(zero_runs, tmp_path, cache_dir):
    """The shipped recipes' SGD through DeepSpeed's universal checkpoint (the momentum carried under Adam's name
    through DeepSpeed's converter, alexdist.distributed.zero_universal): the run equals the uninterrupted ZeRO-2
    run within the fp32 rounding of that training, measured against float64 DDP as the equivalence tests do
    (measured 1.2e-9, bound 4.7e-6); training without momentum differs by 1.4e-4, so a move that lost it could not
    pass."""
    sgd = EQUIV + ["train.global_batch=16", "train.grad_accum=2", "train.grad_clip=0.2",
                   "distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"]
    moved = tmp_path / "moved"
    # The move to 1 process on a filesystem without hard links (os.link refused): the copy is built by copying.
    no_links = run_env(cache_dir, PYTHONPATH=str(_fault_site(tmp_path)), FAULT_SITE="no_hardlinks")
    for nproc, steps, launcher, env in [(2, 3, "accelerate", None), (1, 5, "torchrun", no_links),
                                        (2, 6, "accelerate", None)]:
        check(launch(sgd + [f"train.max_steps={steps}", f"output_dir={moved}"], cache_dir, nproc=nproc,
                     launcher=launcher, env=env))
    assert summary(moved)["resumed_at_step"] == 5 and summary(moved)["world_size"] == 2
    assert not list((moved / "checkpoints").glob(".universal-*"))  # the scratch copies are gone
    ref, bound = flat(zero_runs["zero2"]), fp32_bound(flat(zero_runs["ddp"]), flat(zero_runs["ddp_fp64"]))
    no_momentum = flat(zero_runs["zero2_no_momentum"])
    print(f"\nzero2 sgd 2 -> 1 -> 2: {rel(ref, flat(moved)):.1e} (bound {bound:.1e}; without momentum "
          f"{rel(ref, no_momentum):.1e})")
    assert_same_training(ref, flat(moved), "zero2 sgd 2 -> 1 -> 2", bound=bound)
    assert rel(ref, no_momentum) > 10 * bound  # momentum matters over these steps: agreeing means it was kept


def test_a_zero2_adamw_run_moves_from_2_to_1_to_2_processes_through_a_universal_checkpoint(tmp_path, cache_dir):
    """DeepSpeed's universal checkpoint: the fp32 weights and Adam's moments re-cut for each world size. Adam
    amplifies rounding (its update is ~ g / |g| where gradients are tiny: fp32 and fp64 differ by 7e-3 here), so
    the bound comes from the same training run entirely on 1 process: the moved run differs from the 2-process
    one by rounding of its 1-process steps at most, a few times that distance (measured 5e-8 vs 5.7e-4)."""
    adamw = EQUIV + ["optim.name=adamw", "optim.lr=0.002", "train.global_batch=16", "train.grad_accum=2",
                     "distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"]
    ref, one, moved, lost = tmp_path / "ref", tmp_path / "one", tmp_path / "moved", tmp_path / "lost"
    check(launch(adamw + [f"output_dir={ref}"], cache_dir, nproc=2))
    check(launch(adamw + [f"output_dir={one}"], cache_dir, nproc=1, launcher="torchrun"))
    check(launch(adamw + ["train.max_steps=3", f"output_dir={moved}"], cache_dir, nproc=2))
    shutil.copytree(moved, lost)
    # The control: the same move, but the resume at step 3 loses Adam's moments (a move that dropped them).
    for run, env in [(moved, {}), (lost, {"ALEXDIST_FAULT": "lose_optimizer:3:*"})]:
        for nproc, steps, launcher in [(1, 5, "torchrun"), (2, 6, "accelerate")]:
            check(launch(adamw + [f"train.max_steps={steps}", f"output_dir={run}"], cache_dir, nproc=nproc,
                         launcher=launcher, env=run_env(cache_dir, **env)))
    assert summary(moved)["resumed_at_step"] == 5 and summary(moved)["world_size"] == 2
    assert not list((moved / "checkpoints").glob(".universal-*"))  # the scratch copies are gone
    floor = rel(flat(ref), flat(one))
    assert floor < 1e-2, f"1 and 2 processes disagree by {floor:.1e}: nothing to compare"
    print(f"\nzero2 adamw 2 -> 1 -> 2: {rel(flat(ref), flat(moved)):.1e} (1 process: {floor:.1e}; moments lost: "
          f"{rel(flat(ref), flat(lost)):.1e})")
    assert_same_training(flat(ref), flat(moved), "zero2 2 -> 1 -> 2", bound=3 * floor)
    assert rel(flat(ref), flat(lost)) > 3 * floor  # the bound catches a move that lost the optimizer state


def _fault_site(tmp_path: Path) -> Path:
    """A sitecustomize that makes the filesystem refuse hard links (FAULT_SITE=no_hardlinks, as some network and
    FUSE filesystems do) or also fail every copy (FAULT_SITE=disk_full): the monkeypatch, in launched processes."""
    site = tmp_path / "fault_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import errno, os, shutil\n"
        "mode = os.environ.get('FAULT_SITE')\n"
        "def _refuse(*a, **k):\n"
        "    raise OSError(errno.EPERM, 'Operation not permitted')\n"
        "def _full(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "if mode in ('no_hardlinks', 'disk_full'):\n"
        "    os.link = _refuse\n"
        "if mode == 'disk_full':\n"
        "    shutil.copy2 = _full\n")
    return site


ZERO2_MOVE = EQUIV + ["train.global_batch=16", "distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"]


@pytest.fixture(scope="module")
def zero2_at_step_2(tmp_path_factory, cache_dir) -> Path:
    """A ZeRO-2 run on 1 process stopped at step 2: each test below resumes a copy of it on 2 processes."""
    run = tmp_path_factory.mktemp("zero2-one-process") / "run"
    check(launch(ZERO2_MOVE + ["train.max_steps=2", f"output_dir={run}"], cache_dir, nproc=1, launcher="torchrun"))
    return run


def test_a_failed_universal_conversion_stops_every_rank_at_once_with_one_line(tmp_path, cache_dir, zero2_at_step_2):
    """Rank 0 converts; a full disk there used to escape on rank 0 alone, while the other ranks waited for its
    answer for distributed.setup_timeout_s (30 minutes). Every rank now gets the same error, at once."""
    run = shutil.copytree(zero2_at_step_2, tmp_path / "run")
    env = run_env(cache_dir, PYTHONPATH=str(_fault_site(tmp_path)), FAULT_SITE="disk_full")
    t0 = time.time()
    proc = launch(ZERO2_MOVE + ["train.max_steps=4", f"output_dir={run}"], cache_dir, nproc=2, env=env)
    took = time.time() - t0
    print(f"\nconversion failed on rank 0 -> both ranks gone in {took:.0f} s")
    line = error_line(proc)
    assert proc.returncode != 0 and "could not convert" in line and "No space left on device" in line
    assert took < 120 and not list((run / "checkpoints").glob(".universal-*"))


def test_a_universal_load_that_fails_on_one_rank_stops_every_rank_at_once_naming_it(tmp_path, cache_dir,
                                                                                   zero2_at_step_2):
    """Every rank loads the universal copy; one that failed alone used to leave the others inside DeepSpeed's
    all-gather until distributed.setup_timeout_s, and its own message was never printed (rank 0 speaks). Every rank
    now reports its load before any collective of the load: the failure stops every rank at once, in one line."""
    run = shutil.copytree(zero2_at_step_2, tmp_path / "run")
    env = run_env(cache_dir, ALEXDIST_FAULT="universal_load:2:1")
    t0 = time.time()
    proc = launch(ZERO2_MOVE + ["train.max_steps=4", "distributed.setup_timeout_s=300", f"output_dir={run}"],
                  cache_dir, nproc=2, env=env)
    took = time.time() - t0
    print(f"\nuniversal load failed on rank 1 -> both ranks gone in {took:.0f} s")
    line = error_line(proc)
    assert proc.returncode != 0 and "rank 1 could not load the universal copy" in line, line
    assert "injected by ALEXDIST_FAULT" in line and "resume with the checkpoint's number of processes" in line
    assert took < 150 and not list((run / "checkpoints").glob(".universal-*"))
