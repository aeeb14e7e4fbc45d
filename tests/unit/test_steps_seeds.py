"""The study over seeds (benchmarks/steps_seeds.py): cells of one rule at one batch over train.seed, the median and
range of their steps, efficiencies over every pair of seeds, a critical batch only where the batches bracket it."""

from __future__ import annotations

import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from steps_report import readme
from steps_seeds import Cell, cells, critical_batch, efficiency, seeds_table, split_seed


def _row(recipe: str, rule: str, batch: int, steps: float | None, reached: bool = True, noise: float = 100.0) -> dict:
    return {"recipe": recipe, "rule": rule, "effective_batch": batch, "steps": steps, "reached": reached,
            "crossing_step": steps if reached else None, "crossing_bracket": [0, 0], "returncode": 0, "epochs": 1,
            "final_val_acc": 0.98, "final_test_acc": 0.98, "noise_scale": 1.0,
            "noise_at_crossing": {"noise_scale": noise}, "wall_s": 60, "target": 0.98}


def test_a_rules_seed_is_its_sd_suffix_and_none_is_seed_0():
    assert split_seed("sgd-sqrt-lr0.02-wu3-gc1-ep20-sd2") == ("sgd-sqrt-lr0.02-wu3-gc1-ep20", 2)
    assert split_seed("lars-sqrt-lr1-wu1") == ("lars-sqrt-lr1-wu1", 0)


def test_an_efficiency_is_the_medians_ratio_with_its_range_over_every_pair_of_seeds():
    base, big = Cell("vgg", 128, "r", steps=[1000, 1200]), Cell("vgg", 512, "r", steps=[300, 250])
    med, lo, hi = efficiency(base, big)
    assert med == pytest.approx(1100 / 275 / 4)
    assert (lo, hi) == (pytest.approx(1000 / 300 / 4), pytest.approx(1200 / 250 / 4))
    assert efficiency(base, Cell("vgg", 512, "r")) is None  # no seed reached the target: no efficiency


@pytest.mark.parametrize(("b_crit", "said"), [(1000, "figure"), (50_000, "> 8,192"), (3, "< 128")])
def test_a_critical_batch_is_a_figure_only_where_the_measured_batches_bracket_it(b_crit, said):
    mine = [Cell("bn", b, "r", steps=[500 * (1 + b_crit / b)]) for b in (128, 512, 2048, 8192)]
    text, value = critical_batch(mine)
    if said == "figure":
        assert value == pytest.approx(b_crit, rel=0.03) and text == f"{value:,.0f}"
    else:
        assert text == said


def test_cells_take_the_rule_named_for_each_batch_and_count_a_seed_that_missed():
    rows = [_row("vgg", "a", 128, 1000), _row("vgg", "a-sd1", 128, 1100), _row("vgg", "a-sd2", 128, 900, noise=80),
            _row("vgg", "b", 128, 50),  # another rule: not this cell's
            _row("bn", "lars-lr1", 128, 700), _row("bn", "lars-lr3", 512, 200), _row("bn", "lars-lr3-sd1", 512, None),
            _row("bn", "lars-lr1", 512, 300), _row("bn", "lars-lr3-sd2", 512, 260, reached=False)]
    tuned = {128: "lars-lr1", 512: "lars-lr3"}
    got = {(c.recipe, c.batch): c for c in cells(rows, lambda r, b: tuned[b] if r == "bn" else "a")}
    vgg = got["vgg", 128]
    assert (vgg.seeds, vgg.steps, vgg.median, vgg.noise) == ([0, 1, 2], [1000, 1100, 900], 1000, [100.0, 100.0, 80])
    bn = got["bn", 512]  # the failed run (no steps) left out; the miss counted, not in the median
    assert (bn.rule, bn.seeds, bn.missed, bn.steps) == ("lars-lr3", [0, 2], [2], [200])
    line = next(x for x in seeds_table(list(got.values())) if x.startswith("| bn | lars-lr3 | 512"))
    assert "| 2, 1 missed |" in line and f"{700 / 200 / 4:.2f}" in line


def test_the_report_has_a_section_over_seeds_only_once_a_rule_ran_under_another_seed():
    one = [_row("vgg", "a", 128, 1000), _row("vgg", "a", 2048, 100)]
    assert "## Over seeds" not in readme(one, {"vgg": "a"})
    text = readme(one + [_row("vgg", "a-sd1", 128, 1200), _row("vgg", "a-sd1", 2048, 110)], {"vgg": "a"})
    assert "## Over seeds" in text and "| vgg | a | 2048 | 2 | 105 (100-110) |" in text
