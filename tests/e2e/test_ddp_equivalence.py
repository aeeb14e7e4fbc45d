"""DDP's distributed semantics, end to end through the real launchers on 2 CPU ranks, proven in float64: the same
training on 2 ranks x B, 1 rank x 2B, with gradient accumulation, through torchrun, and across a change of world
size, reaches the same weights to ~1e-17 (see helpers.FP64_BOUND)."""

import pytest
from helpers import EQUIV, FP64, assert_same_training, check, flat, launch, read_jsonl, summary


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("equiv")
    cases = {
        "1x16": {"nproc": 1, "extra": ["train.batch_size=16"]},
        "2x8": {"nproc": 2, "extra": ["train.batch_size=8"]},
        "2x4x2acc": {"nproc": 2, "extra": ["train.batch_size=4", "train.grad_accum=2"]},
        "1x8x2acc": {"nproc": 1, "extra": ["train.batch_size=8", "train.grad_accum=2"]},
        "torchrun2x8": {"nproc": 2, "extra": ["train.batch_size=8"], "launcher": "torchrun"},
    }
    runs = {}
    for name, c in cases.items():
        out = root / name
        check(launch(EQUIV + FP64 + c["extra"] + [f"output_dir={out}"], cache_dir, nproc=c["nproc"],
                     launcher=c.get("launcher", "accelerate")))
        runs[name] = out
    return runs


def test_two_ranks_really_form_one_gloo_group(equivalence_runs):
    for name in ("2x8", "2x4x2acc", "torchrun2x8"):
        s = summary(equivalence_runs[name])
        assert s["world_size"] == 2 and s["distributed_type"] == "DistributedType.MULTI_CPU", name
        assert len(s["rank_param_sums"]) == 2
        assert s["rank_param_sums"][0] == s["rank_param_sums"][1], "ranks drifted apart: no gradient all-reduce"


def test_two_ranks_of_batch_b_equal_one_rank_of_batch_2b(equivalence_runs):
    ref = flat(equivalence_runs["1x16"])
    for name in ("2x8", "torchrun2x8"):
        assert_same_training(ref, flat(equivalence_runs[name]), name)


def test_gradient_accumulation_equals_one_larger_step(equivalence_runs):
    ref = flat(equivalence_runs["1x16"])
    assert_same_training(ref, flat(equivalence_runs["1x8x2acc"]), "1 rank: 2 x 8 == 1 x 16")
    assert_same_training(ref, flat(equivalence_runs["2x4x2acc"]), "2 ranks: 2 x (2 x 4) == 1 x 16")


def test_max_steps_caps_training_and_still_ends_with_a_logged_test_evaluation(equivalence_runs):
    run = equivalence_runs["2x8"]
    events = read_jsonl(run / "metrics.jsonl")
    assert events[0]["event"] == "start" and events[0]["effective_batch"] == 16
    assert events[-1]["event"] == "test" and events[-1]["step"] == 6
    cm = events[-1]["confusion"]
    assert events[-1]["acc"] == sum(cm[i][i] for i in range(len(cm))) / sum(map(sum, cm)) and sum(map(sum, cm)) == 256
    s = summary(run)
    assert s["steps"] == 6 and s["final_test_acc"] == events[-1]["acc"]


def test_ddp_resumes_across_world_sizes_2_1_2_with_the_global_batch_kept(tmp_path, cache_dir):
    from helpers import error_line

    base = [a for a in EQUIV if not a.startswith("train.max_steps")] + FP64 + ["train.global_batch=16"]
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    check(launch(base + ["train.max_steps=12", f"output_dir={whole}"], cache_dir, nproc=2))
    check(launch(base + ["train.max_steps=4", f"output_dir={moved}"], cache_dir, nproc=2))
    check(launch(base + ["train.max_steps=8", f"output_dir={moved}"], cache_dir, nproc=1))
    s = summary(moved)
    assert s["world_size"] == 1 and s["batch_size_per_process"] == 16 and s["resumed_at_step"] == 4
    check(launch(base + ["train.max_steps=12", f"output_dir={moved}"], cache_dir, nproc=2))
    s = summary(moved)
    assert s["world_size"] == 2 and s["batch_size_per_process"] == 8 and s["resumed_at_step"] == 8
    assert_same_training(flat(whole), flat(moved), "2 -> 1 -> 2 processes")

    # Without the global batch held, the data position and schedule would not carry over: refused, with the fix.
    plain = [a for a in base if not a.startswith("train.global_batch")] + ["train.batch_size=8", "train.max_steps=14"]
    proc = launch(plain + [f"output_dir={moved}"], cache_dir, nproc=1)
    assert proc.returncode == 2
    assert "set train.global_batch=16" in error_line(proc)


# A resume may change train.grad_accum at the same effective batch. Accelerate restores its micro-step count from
# the checkpoint: without a reset, after 1 -> 2 at an odd step each update mixed two steps' halves.
ACCUM = ["train.global_batch=48"]


@pytest.mark.parametrize("before, after, at", [(1, 2, 3), (2, 3, 4), (2, 1, 3)])  # 2 -> 1: the guard
def test_a_resume_with_another_accumulation_at_the_same_effective_batch_trains_the_same(
        before, after, at, tmp_path, cache_dir):
    ref, run = tmp_path / "uninterrupted", tmp_path / "changed"
    check(launch(EQUIV + FP64 + ACCUM + [f"train.grad_accum={before}", f"output_dir={ref}"], cache_dir))
    check(launch(EQUIV + FP64 + ACCUM + [f"train.grad_accum={before}", f"train.max_steps={at}",
                                         f"output_dir={run}"], cache_dir))
    check(launch(EQUIV + FP64 + ACCUM + [f"train.grad_accum={after}", f"output_dir={run}"], cache_dir))
    assert summary(run)["resumed_at_step"] == at and summary(run)["steps"] == 6
    assert_same_training(flat(ref), flat(run), f"{before} -> {after} at step {at}")
