"""The divergence guard: NaN losses injected on one rank are detected on every rank, skipped, and survived.

(The run that keeps diverging and stops with the last good checkpoint kept is a case in test_error_messages.py.)
"""

from __future__ import annotations

import pytest
import torch
from helpers import check, launch, read_jsonl, run_env, summary
from safetensors.torch import load_file

RUN = ["data.source=synthetic", "data.synthetic_train=512", "data.synthetic_test=128", "train.epochs=2",
       "train.batch_size=32", "tracking.wandb=false", "train.log_every=1", "model.width_mult=0.25",
       "train.max_bad_steps=3", "checkpoint.every_steps=2"]


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_nan_loss_on_one_rank_is_skipped_on_every_rank_and_the_run_finishes(tmp_path, cache_dir, strategy):
    config = "recipes/accelerate/zero2.yaml" if strategy == "zero2" else None
    run = tmp_path / strategy
    env = run_env(cache_dir, ALEXDIST_FAULT="nan:5-6:1")  # rank 1 only, two steps in a row (< max_bad_steps)
    proc = check(launch(RUN + [f"output_dir={run}"], cache_dir, nproc=2, env=env, config_file=config))
    events = read_jsonl(run / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "bad_step"] == [5, 6]
    s = summary(run)
    assert s["status"] == "finished" and s["world_size"] == 2
    if s["rank_param_sums"]:
        assert s["rank_param_sums"][0] == s["rank_param_sums"][1]  # both ranks skipped the same steps
    weights = load_file(str(run / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())  # BN statistics included
    train_losses = [e["loss"] for e in events if e["event"] == "train"]
    assert all(loss == loss for loss in train_losses)  # the skipped steps' NaN stays out of the epoch's loss
    assert s["final_test_acc"] is not None and "alexdist: error" not in proc.stderr


def test_an_epoch_whose_every_step_was_skipped_ends_with_nan_figures_not_a_crash(tmp_path, cache_dir):
    """A large batch's short epoch can end before train.max_bad_steps: every step of it skipped, nothing to
    average (it once ended in a ZeroDivisionError, seen in the recipe study at batch 8192)."""
    run = tmp_path / "run"
    env = run_env(cache_dir, ALEXDIST_FAULT="nan:1-:*")
    check(launch(RUN + ["train.max_bad_steps=100", "train.max_steps=3", f"output_dir={run}"], cache_dir, env=env))
    train = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "train"]
    assert len(train) == 1 and train[0]["loss"] != train[0]["loss"]  # NaN
    assert summary(run)["status"] == "max_steps"
