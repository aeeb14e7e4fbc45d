"""The study over seeds (issue 40's protocol): per recipe and batch, the steps to the validation target as the
median and min-max over seeds; each efficiency against batch 128 with its range over every pair of seeds; the
critical batch fitted to the medians, given as a figure only where the measured batches bracket it (else as a
bound); the noise scale read at each run's crossing beside it.

A cell is the runs of one rule at one batch: `-sd<N>` in a rule is train.seed N, the rule without it seed 0. Which
rule a cell takes is the caller's (`rule_for`): a recipe's shipped rule, or bn's winner of its batch's tuning.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from steps_report import critical_batch as fitted
from steps_report import noise_of, steps_of

SEED = re.compile(r"-sd(\d+)$")


def split_seed(rule: str) -> tuple[str, int]:
    """(the rule without its seed, the seed): `sgd-...-ep20-sd2` -> (`sgd-...-ep20`, 2); no suffix is seed 0."""
    m = SEED.search(rule)
    return (rule[:m.start()], int(m.group(1))) if m else (rule, 0)


@dataclass
class Cell:
    recipe: str
    batch: int
    rule: str
    steps: list[float] = field(default_factory=list)  # of the seeds that reached the target
    seeds: list[int] = field(default_factory=list)  # every seed run, reached or not
    missed: list[int] = field(default_factory=list)  # the seeds that did not reach it in their budget
    noise: list[float] = field(default_factory=list)  # at the crossing
    test_acc: list[float] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.steps) if self.steps else None


def cells(rows: list[dict], rule_for: Callable[[str, int], str | None]) -> list[Cell]:
    """The finished runs grouped by (recipe, batch) under the rule `rule_for(recipe, batch)` names; a failed run
    is left out, a run that missed the target counts as a miss. An efficiency then compares the rules the two
    batches take (bn: each batch's tuned one)."""
    out: dict[tuple[str, int], Cell] = {}
    for r in sorted(rows, key=lambda r: split_seed(r["rule"])[1]):
        rule, seed = split_seed(r["rule"])
        # A failed run (steps_report shows it as such) is no outcome; a diverged one missed the target.
        failed = r.get("status") != "diverged" and (r["returncode"] not in (0, None) or r["steps"] is None)
        if rule != rule_for(r["recipe"], r["effective_batch"]) or failed:
            continue
        cell = out.setdefault((r["recipe"], r["effective_batch"]), Cell(r["recipe"], r["effective_batch"], rule))
        cell.seeds.append(seed)
        if not r["reached"]:
            cell.missed.append(seed)
            continue
        cell.steps.append(steps_of(r))
        if noise_of(r):
            cell.noise.append(noise_of(r))
        if r.get("final_test_acc") is not None:
            cell.test_acc.append(r["final_test_acc"])
    return sorted(out.values(), key=lambda c: (c.recipe, c.batch))


def efficiency(base: Cell, cell: Cell) -> tuple[float, float, float] | None:
    """steps(base) / steps(cell) / (batch ratio): of the medians, and its min and max over every pair of seeds
    (one seed's base run against one seed's run); None where either has no run that reached the target."""
    if not base.steps or not cell.steps:
        return None
    k = cell.batch / base.batch
    pairs = [b / s / k for b in base.steps for s in cell.steps]
    return base.median / cell.median / k, min(pairs), max(pairs)


def critical_batch(mine: list[Cell]) -> tuple[str, float | None]:
    """B_crit fitted to the cells' medians, as said (steps_report.critical_batch) and its value."""
    said, value, _ = fitted([(c.batch, c.median) for c in mine if c.steps])
    return said, value


def _range(values: list[float], fmt: str = ",.0f") -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    return f"{med:{fmt}}" if len(values) == 1 else f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def seeds_table(all_cells: list[Cell]) -> list[str]:
    lines = ["| recipe | rule | batch | seeds | steps to target: median (min-max) | efficiency vs 128: median "
             "(range over seed pairs) | noise scale at the crossing: median (min-max) | test acc |",
             "|" + "---|" * 8]
    base = {c.recipe: c for c in all_cells if c.batch == 128}
    for c in all_cells:
        eff = efficiency(base[c.recipe], c) if c.recipe in base and c.batch != 128 else None
        eff_text = "—" if eff is None else f"{eff[0]:.2f} ({eff[1]:.2f}-{eff[2]:.2f})"
        missed = f", {len(c.missed)} missed" if c.missed else ""
        acc = _range([100 * a for a in c.test_acc], ".2f")
        lines.append(f"| {c.recipe} | {c.rule} | {c.batch} | {len(c.seeds)}{missed} | {_range(c.steps)} | "
                     f"{eff_text} | {_range(c.noise)} | {acc} |")
    return lines


def critical_table(all_cells: list[Cell]) -> list[str]:
    """Per recipe: B_crit fitted to the medians beside the noise scale the runs measured at their crossing."""
    lines = ["| recipe | batches | fitted B_crit (of the medians) | noise scale at the crossing (median of every "
             "run) | ratio |", "|---|---|---|---|---|"]
    for recipe in sorted({c.recipe for c in all_cells}):
        mine = [c for c in all_cells if c.recipe == recipe]
        said, value = critical_batch(mine)
        noise = [n for c in mine for n in c.noise]
        measured = statistics.median(noise) if noise else None
        bracketed = value is not None and not said.startswith(("<", ">"))
        ratio = f"{max(value, measured) / min(value, measured):.1f}x" if bracketed and measured else "—"
        batches = ", ".join(str(c.batch) for c in mine if c.steps)
        lines.append(f"| {recipe} | {batches} | {said} | {f'{measured:,.0f}' if measured else '—'} | {ratio} |")
    return lines
