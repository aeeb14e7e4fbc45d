"""The steps-to-target study's arithmetic (benchmarks/steps_report.py, benchmarks/recipes.py): the critical-batch
fit, the scaling efficiency and the step budget a rule asks for."""

from __future__ import annotations

import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from steps_report import fit_critical_batch, table

from recipes import command_args, epoch_cap


def test_the_fit_recovers_the_critical_batch_of_steps_that_follow_mccandlish():
    s_min, b_crit = 80.0, 3000.0
    points = [(b, round(s_min * (1 + b_crit / b))) for b in (128, 512, 2048, 8192)]
    fit = fit_critical_batch(points)
    assert fit is not None
    assert fit[0] == pytest.approx(s_min, rel=0.02) and fit[1] == pytest.approx(b_crit, rel=0.03)
    # perfect scaling (S proportional to 1/B) has no finite critical batch inside the grid: the fit runs to its edge
    assert fit_critical_batch([(b, 128_000 // b) for b in (128, 512, 2048)])[1] > 100 * b_crit
    assert fit_critical_batch(points[:1]) is None


def _row(rule: str, batch: int, steps: int) -> dict:
    return {"recipe": "vgg", "rule": rule, "effective_batch": batch, "steps": steps, "reached": True,
            "returncode": 0, "epochs": 1, "final_val_acc": 0.98, "final_test_acc": 0.98, "noise_scale": None,
            "wall_s": 60}


def test_efficiency_compares_a_batch_with_batch_128_under_the_same_rule_only():
    rows = [_row("a", 128, 4000), _row("a", 512, 1000), _row("b", 128, 2000), _row("b", 512, 1000)]
    lines = {(c[2], c[3]): c for c in ([x.strip() for x in line.split("|")] for line in table(rows)[2:])}
    assert lines["a", "512"][8] == "1.00" and lines["b", "512"][8] == "0.50"


def test_a_rules_epoch_budget_raises_the_cap_at_every_batch_and_small_batches_keep_their_minimum():
    assert epoch_cap(2048, "sgd-sqrt-lr0.02-wu3-gc1") == 10
    assert epoch_cap(2048, "sgd-sqrt-lr0.02-wu3-gc1-ep20") == 20
    assert epoch_cap(8192, "sgd-sqrt-lr0.02-wu3-gc1") == 34  # 200 steps at 6 per epoch, past the 10-epoch minimum
    assert epoch_cap(8192, "sgd-sqrt-lr0.02-wu3-gc1-ep20") == 34
    args = command_args("vgg", 512, "sgd-sqrt-lr0.02-wu3-gc1-ep20", "out")
    assert "train.epochs=20" in args and "train.grad_clip=1.0" in args and not any("ep20" in a for a in args)
