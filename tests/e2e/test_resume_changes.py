"""A resume with other training settings, allowed on purpose (checkpoint.allow_config_change), trains with them
from the resumed step on, and the run's record says so; more epochs continue the decay without raising the lr.
One CPU process on the digits (the refusals themselves are in test_error_messages.py)."""

from __future__ import annotations

import itertools

import pytest
import yaml
from helpers import check, launch, read_jsonl, summary

RUN = ["tracking.wandb=false", "train.log_every=1", "train.epochs=1"]  # 44 steps of 32; one-cycle, 0.05 / 64 x 32
ALLOW = ["checkpoint.allow_config_change=true"]


def _lrs(run):
    return {e["step"]: e["lr"] for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "step"}


def test_a_new_lr_and_schedule_apply_from_the_resumed_step_and_are_recorded(tmp_path, cache_dir):
    run = tmp_path / "run"
    check(launch(RUN + ["train.max_steps=10", f"output_dir={run}"], cache_dir))
    proc = check(launch(RUN + ALLOW + ["train.max_steps=14", "optim.lr=0.5", "optim.momentum=0.5",
                                       "schedule.name=constant", "schedule.warmup_frac=0", f"output_dir={run}"],
                        cache_dir))
    lrs = _lrs(run)
    assert lrs[10] < 0.03  # the first attempt's one-cycle warmup
    # optim.lr 0.5 for ref_batch 64, scaled linearly to this run's 32: 0.25, constant, from step 11 on.
    assert [lrs[s] for s in (11, 12, 13, 14)] == [0.25] * 4
    assert "peak lr 0.25" in proc.stdout
    s = summary(run)
    assert s["peak_lr"] == 0.25 and s["config_changes"][0]["step"] == 10
    assert "optim.lr: 0.05 -> 0.5" in s["config_changes"][0]["changes"]
    assert yaml.safe_load((run / "config.yaml").read_text())["schedule"]["name"] == "constant"
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["optim"]["momentum"] == 0.5


@pytest.mark.parametrize("stopped_at", [30, 44])  # mid-decay, and a finished run (its lr is at the end: 0)
def test_more_epochs_continue_the_decay_from_where_it_was_and_never_raise_the_lr(stopped_at, tmp_path, cache_dir):
    run = tmp_path / "run"
    check(launch(RUN + [f"train.max_steps={stopped_at}", f"output_dir={run}"], cache_dir))
    proc = check(launch(RUN + ALLOW + ["train.epochs=2", f"output_dir={run}"], cache_dir))
    assert ("the added epochs train at lr 0" in proc.stdout) == (stopped_at == 44)  # said where it is useless
    lrs = _lrs(run)
    s = summary(run)
    assert (s["status"], s["steps"]) == ("finished", 88)
    later = [lrs[k] for k in range(stopped_at, 89)]
    assert all(b <= a for a, b in itertools.pairwise(later)), later  # never up
    if stopped_at == 30:
        assert lrs[31] > 0.5 * lrs[30] and lrs[88] == pytest.approx(0.0, abs=1e-12)  # it goes on, to the end
    # The schedule of 2 epochs from the start would have put step 31 far higher (the control).
    fresh = tmp_path / "two-epochs"
    check(launch(RUN + ["train.epochs=2", "train.max_steps=31", f"output_dir={fresh}"], cache_dir))
    assert _lrs(fresh)[31] > lrs[31] * 1.5
