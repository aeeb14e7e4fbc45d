"""The steps-to-target study's report (benchmarks/recipes.py report): per recipe and batch, the optimizer steps to
the validation target; the scaling efficiency against batch 128; McCandlish's S = S_min (1 + B_crit / B) fitted
to the steps, beside the noise scale the runs measured; and the log-log plot (Shallue et al.'s figure)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "steps_to_target"


def fit_critical_batch(points: list[tuple[int, int]]) -> tuple[float, float] | None:
    """(S_min, B_crit) of S = S_min (1 + B_crit / B) by least squares on log S (steps span decades), over a
    log-spaced grid of B_crit with S_min in closed form; None with fewer than two points."""
    if len(points) < 2:
        return None
    best = None
    for i in range(601):  # B_crit from 1 to 1e6
        b_crit = 10 ** (i / 100)
        shape = [math.log(1 + b_crit / b) for b, _ in points]
        log_s_min = sum(math.log(s) - f for (_, s), f in zip(points, shape, strict=True)) / len(points)
        err = sum((math.log(s) - log_s_min - f) ** 2 for (_, s), f in zip(points, shape, strict=True))
        if best is None or err < best[0]:
            best = (err, math.exp(log_s_min), b_crit)
    return best[1], best[2]


def critical_batch(points: list[tuple[int, float]]) -> tuple[str, float | None, float | None]:
    """(B_crit as said, B_crit, S_min) fitted to (batch, steps) points: a figure where the measured batches bracket
    it, else a bound (`< 128`, `> 8,192`); ("—", None, None) with fewer than two points."""
    fit = fit_critical_batch(points)
    if fit is None:
        return "—", None, None
    lo, hi = min(b for b, _ in points), max(b for b, _ in points)
    said = f"< {lo:,}" if fit[1] < lo else f"> {hi:,}" if fit[1] > hi else f"{fit[1]:,.0f}"
    return said, fit[1], fit[0]


def steps_of(r: dict) -> float:
    """The steps to the target: the crossing interpolated between two evaluations where the run recorded it
    (protocol 2), else the step of the first evaluation at or above the target (an epoch end)."""
    return r.get("crossing_step") or r["steps"]


def noise_of(r: dict) -> float | None:
    """The run's noise scale: read at the target's crossing where recorded, else at the run's end."""
    at = r.get("noise_at_crossing") or {}
    return at.get("noise_scale") if r.get("crossing_step") else r.get("noise_scale")


def _cell(r: dict) -> str:
    if r.get("status") == "diverged":
        return f"diverged at step {r['steps']}"
    if r["returncode"] not in (0, None) or r["steps"] is None:
        return "failed"
    if not r["reached"]:
        return f"> {r['steps']} (not reached)"
    if r.get("crossing_step"):
        lo, hi = r["crossing_bracket"]
        return f"{r['crossing_step']:.0f} ({lo}-{hi})"
    return f"{r['steps']}"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def table(rows: list[dict]) -> list[str]:
    """One row per (recipe, batch) of the given runs."""
    lines = ["| recipe | rule | batch | steps to target | epochs | val acc | test acc | efficiency vs 128 | "
             "noise scale | wall (min) |", "|" + "---|" * 10]
    # Against batch 128 under the same rule: another rule's steps (another step budget) would not compare.
    base = {(r["recipe"], r["rule"]): steps_of(r) for r in rows if r["effective_batch"] == 128 and r["reached"]}
    for r in sorted(rows, key=lambda r: (r["recipe"], r["rule"], r["effective_batch"])):
        eff = "—"
        if r["reached"] and (r["recipe"], r["rule"]) in base:
            eff = f"{base[r['recipe'], r['rule']] / steps_of(r) / (r['effective_batch'] / 128):.2f}"
        noise = f"{noise_of(r):,.0f}" if noise_of(r) else "—"
        lines.append(f"| {r['recipe']} | {r['rule']} | {r['effective_batch']} | {_cell(r)} | {r['epochs']} | "
                     f"{_pct(r['final_val_acc'])} | {_pct(r['final_test_acc'])} | {eff} | {noise} | "
                     f"{r['wall_s'] / 60:.0f} |")
    return lines


def fits(rows: list[dict]) -> list[str]:
    where = "at the target's crossing" if any(r.get("crossing_step") for r in rows) else "at their end"
    lines = [f"| recipe | S_min | fitted B_crit | measured noise scale (median of the runs, {where}) | ratio |",
             "|---|---|---|---|---|"]
    for recipe in sorted({r["recipe"] for r in rows}):
        mine = [r for r in rows if r["recipe"] == recipe and r["reached"]]
        said, b_crit, s_min = critical_batch([(r["effective_batch"], steps_of(r)) for r in mine])
        noise = [noise_of(r) for r in mine if noise_of(r)]
        measured = statistics.median(noise) if noise else None
        # A ratio only to a bracketed B_crit: a bound's value is wherever the fit ran out of data.
        ratio = f"{max(b_crit, measured) / min(b_crit, measured):.1f}x" if measured and said[0].isdigit() else "—"
        lines.append(f"| {recipe} | {'—' if s_min is None else f'{s_min:,.0f}'} | {said} | "
                     f"{f'{measured:,.0f}' if measured else '—'} | {ratio} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Steps to target against batch, log-log, per recipe: the runs, perfect scaling from batch 128, the fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=100)
    for i, recipe in enumerate(sorted({r["recipe"] for r in rows})):
        color = f"C{i}"
        mine = sorted((r for r in rows if r["recipe"] == recipe), key=lambda r: r["effective_batch"])
        hit = [(r["effective_batch"], steps_of(r)) for r in mine if r["reached"]]
        miss = [(r["effective_batch"], r["steps"]) for r in mine if not r["reached"] and r["steps"]]
        if hit:
            label = f"{recipe} (target {100 * mine[0]['target']:g} %)"
            ax.plot(*zip(*hit, strict=True), "o-", color=color, label=label)
        if miss:
            ax.plot(*zip(*miss, strict=True), "x", color=color, markersize=10, label=f"{recipe}: not reached")
        base = next((s for b, s in hit if b == 128), None)
        xs = [128 * 2 ** (k / 4) for k in range(25)]
        if base:
            ax.plot(xs, [base * 128 / x for x in xs], ":", color=color, alpha=0.6)
        if fit := fit_critical_batch(hit):
            ax.plot(xs, [fit[0] * (1 + fit[1] / x) for x in xs], "--", color=color, alpha=0.8,
                    label=f"{recipe}: S_min(1 + B_crit/B), B_crit {fit[1]:,.0f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("effective batch", fontsize=12)
    ax.set_ylabel("optimizer steps to the validation target", fontsize=12)
    ax.set_title("Steps to target on MNIST (x0.25 width); dotted: perfect scaling from batch 128", fontsize=12)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


NEXT_STUDY = """## How the next study runs

`nice -n 19 .venv/bin/python benchmarks/recipes.py run` runs protocol 2 (issue 40). Its run ids end in `-p2`; once
one of its result files exists, this page reports protocol 2's runs alone (the first study's files stay beside
them).

- No flips (`augment.flip=false`): a mirrored digit is another symbol, or none.
- The target checked inside an epoch (`eval.val_checks.per_epoch=8`, `eval.val_checks.within=0.01`): once a
  validation accuracy is within a point of the target, the validation split is evaluated after 8 steps spread over
  each epoch (every step where an epoch has fewer: batch 8192's 6), its loss beside its accuracy (`val_check`
  events). The steps to target are the crossing interpolated linearly between the last evaluation below the target
  and the first at or above it, shown with that bracket (the run stops at its end): ~53 steps wide at batch 128
  (~2 % of ~3,000), ~3 at 2048. The evaluations leave the training bit for bit the same
  (tests/unit/test_val_checks.py).
- The noise scale's two terms (|G|^2 and tr Σ) are averaged over the last ~65,536 examples, the same stretch of
  training at every batch (until now ~100 steps: 13k examples at batch 128, 800k at 8192), and read at the
  crossing (`noise_at_crossing` in each result file); the fitted B_crit is compared with those.
- Each run lives in `runs/study/<id>/` (STUDY_RUNS) and is checkpointed at every epoch end; Ctrl-C or SIGTERM
  checkpoints at once, and running the study again resumes it. A run with a result file is skipped. Each row
  records the commit (`+dirty` with local changes), the CPU, torch and ATEN_CPU_CAPABILITY (as set, and as torch
  reports it).
"""


def latest_protocol(results: list[dict]) -> list[dict]:
    """The runs of the newest protocol present (the first study's files carry none: protocol 1)."""
    newest = max((r.get("protocol", 1) for r in results), default=1)
    return [r for r in results if r.get("protocol", 1) == newest]


def over_seeds(results: list[dict], rule_for) -> list[str]:
    """The section over seeds, where any rule ran under more than one seed (steps_seeds.py); else nothing."""
    from steps_seeds import cells, critical_table, seeds_table, split_seed

    if not any(split_seed(r["rule"])[1] for r in results):
        return []
    grouped = cells(results, rule_for)
    return ["## Over seeds", "",
            "Each cell: the runs of one rule at one batch under train.seed 0, 1, 2, ... (`-sd<N>` in a run id; "
            "none is seed 0). bn takes its batch's tuned rule where the tuning has a winner (tuning/), the others "
            "their shipped rule. An efficiency's range is over every pair of seeds (one at 128, one at the batch). "
            "The critical batch is fitted to the medians, and given as a bound where it lies outside the batches "
            "measured.", "", *seeds_table(grouped), "", *critical_table(grouped), ""]


def readme(results: list[dict], shipped: dict[str, str], rule_for=None) -> str:
    """README.md of the results folder: the shipped rules' grid, the cells over seeds, then every run, then how
    the next study runs. `rule_for(recipe, batch)`: the rule a cell over seeds takes (default: the shipped one)."""
    rule_for = rule_for or (lambda recipe, batch: shipped.get(recipe))
    main = [r for r in results if shipped.get(r["recipe"]) == r["rule"]]
    if any(r.get("crossing_step") for r in main):
        noise = ("A run's noise scale is read at its target's crossing, its two terms averaged over the last ~65,536 "
                 "examples (the same stretch of training at every batch).")
    else:
        noise = ("A run's noise scale is a moving average over its steps, and the estimate grows as the loss falls "
                 "(McCandlish et al.): a large-batch run, which reaches the target in few steps, ends with an average "
                 "that still holds its early, small values. Read the critical batch from the small-batch runs and the "
                 "fit.")
    text = ["# Steps to a validation target against the batch", "",
            "Produced by `python benchmarks/recipes.py report` from the JSON files beside it. This first table: "
            "one run per cell (seed 0; the cells over seeds follow). MNIST, x0.25 width, 2 CPU processes x "
            "accumulation; each recipe's shipped rule.", "",
            *table(main), "", "Efficiency: steps(128) / steps(B) / (B / 128); 1 is perfect scaling.", "",
            *fits(main), "", noise,
            "", "![steps to target](steps_to_target.png)", "", *over_seeds(results, rule_for), "## Every run", "",
            *table(results), "", NEXT_STUDY]
    return "\n".join(text)


def report(results: list[dict], shipped: dict[str, str], rule_for=None) -> str:
    """README.md of the results folder and the plot, from the newest protocol's runs."""
    results = latest_protocol(results)
    main = [r for r in results if shipped.get(r["recipe"]) == r["rule"]]
    # A recipe with no run under its shipped rule is drawn with the runs it has (their rule named in the table).
    plot(main + [r for r in results if r["recipe"] not in {m["recipe"] for m in main}], OUT / "steps_to_target.png")
    text = readme(results, shipped, rule_for)
    (OUT / "README.md").write_text(text)
    return text
