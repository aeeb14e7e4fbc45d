"""The first recipe study's table and plots (benchmarks/results/recipes/): final test accuracy by recipe, effective
batch and rule, at each width and epoch budget; one PNG per (width, epochs) of accuracy against batch. The study
is finished and superseded by the steps-to-target study (benchmarks/recipes.py, benchmarks/results/steps_to_target/);
this regenerates its README and plots from its result files: `python benchmarks/recipes_report.py`."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "recipes"
MAIN_RULES = ("before", "chosen")
# The rule this study chose for each recipe. bn's is still its recipe's; vgg and alexnet kept `before` here and
# have since moved to the rules the steps-to-target study chose (benchmarks/recipes.py, SHIPPED).
CHOSEN = {"bn": "lars-sqrt-lr1-wu1", "vgg": "before", "alexnet": "before"}


def as_chosen(results: list[dict], chosen: dict[str, str]) -> list[dict]:
    """The results, with each recipe's chosen rule also named `chosen`, beside its other names."""
    return [*results, *({**r, "rule": "chosen"} for r in results if chosen.get(r["recipe"]) == r["rule"])]


def diverged(r: dict) -> bool:
    """The divergence stop, or a loss gone non-finite or above 1e3 (the frozen tree the study first ran on ended
    an epoch whose every step was skipped in a ZeroDivisionError, fixed since: loop.end_epoch)."""
    last = r["train_loss"][-1][1] if r["train_loss"] else 0.0
    return "diverged" in (r.get("error") or "") or not (abs(last) < 1e3)


def _acc(r: dict) -> str:
    if r["returncode"] not in (0, None) or r["final_test_acc"] is None:
        return "diverged" if diverged(r) else "failed"
    return f"{100 * r['final_test_acc']:.2f}"


def table(results: list[dict], rules: tuple[str, ...] | None = None) -> list[str]:
    """Markdown: one row per (recipe, width, epochs, batch), one column per rule (final test accuracy, %)."""
    cells: dict[tuple, dict[str, str]] = defaultdict(dict)
    seen_rules: list[str] = []
    for r in results:
        if rules and r["rule"] not in rules:
            continue
        cells[(r["recipe"], r["width"], r["epochs"], r["effective_batch"])][r["rule"]] = _acc(r)
        if r["rule"] not in seen_rules:
            seen_rules.append(r["rule"])
    cols = [c for c in (rules or ()) if c in seen_rules] or sorted(seen_rules)
    lines = ["| recipe | width | epochs | effective batch | " + " | ".join(cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[2], k[3])):
        lines.append(f"| {key[0]} | ×{key[1]:g} | {key[2]} | {key[3]} | "
                     + " | ".join(cells[key].get(c, "") for c in cols) + " |")
    return lines


def plot(results: list[dict], width: float, epochs: int, path: Path, chosen: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Every rule: the two main ones as lines, each explored rule as its own markers (most ran at one batch).
    # (The chosen rule's own name is left out: its points are the `chosen` line.)
    rows = [r for r in results if r["width"] == width and r["epochs"] == epochs
            and (r["rule"] == "before" or r["rule"] != chosen.get(r["recipe"]))]
    recipes = sorted({r["recipe"] for r in rows})
    if not recipes:
        return
    fig, axes = plt.subplots(1, len(recipes), figsize=(4.6 * len(recipes), 4.2), squeeze=False)
    for ax, recipe in zip(axes[0], recipes, strict=True):
        rules = sorted({r["rule"] for r in rows if r["recipe"] == recipe},
                       key=lambda x: (x not in MAIN_RULES, MAIN_RULES.index(x) if x in MAIN_RULES else 0, x))
        for n, rule in enumerate(rules):
            pts = sorted((r["effective_batch"], 100 * (r["final_test_acc"] or 0)) for r in rows
                         if r["recipe"] == recipe and r["rule"] == rule)
            style = {"before": "o--", "chosen": "s-"}.get(rule, "^xdvp*<>hD"[n % 10])
            label = {"before": "before (linear, short warmup)", "chosen": "chosen by this study"}.get(rule, rule)
            ax.plot(*zip(*pts, strict=True), style, label=label, markersize=7 if rule in MAIN_RULES else 6)
            for r in rows:  # a run that ended in an error is drawn at 0: say so
                if r["recipe"] == recipe and r["rule"] == rule and r["final_test_acc"] is None:
                    ax.annotate("diverged", (r["effective_batch"], 0), textcoords="offset points", xytext=(-52, 4),
                                fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{recipe} (×{width:g} width, {epochs} epochs)")
        ax.set_xlabel("effective batch")
        ax.set_ylabel("MNIST test accuracy (%)")
        ax.set_ylim(bottom=max(0, ax.get_ylim()[0]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: list[dict], chosen: dict[str, str] = CHOSEN) -> str:
    everything = results
    results = as_chosen(results, chosen)
    lines = ["# Recipe study on real MNIST", "",
             "The first recipe study: final test accuracy (%) after a fixed epoch budget; 2 processes x accumulation "
             "x up to 128 per process. `before`: the recipes as shipped before the study (linear lr scaling, 1-5 % "
             "warmup); `chosen`: the rule this study chose ("
             + ", ".join(f"{k}: `{v}`" for k, v in chosen.items()) + "). bn's recipe still holds its rule; vgg's and "
             "alexnet's now hold SGD with sqrt scaling, 3 warmup epochs and gradient clipping, chosen on validation "
             "accuracy by the steps-to-target study ([../steps_to_target/](../steps_to_target/README.md)). Rule "
             "names: `<optimizer>-<lr scaling>-lr<lr at batch 128>-wu<warmup epochs>`. Regenerate: "
             "`python benchmarks/recipes_report.py`.", "",
             *table(results, MAIN_RULES), "", "## Every rule tried", "", *table(everything), ""]
    for width, epochs in sorted({(r["width"], r["epochs"]) for r in results}):
        name = f"accuracy_vs_batch_w{width:g}_e{epochs}.png"
        plot(results, width, epochs, OUT / name, chosen)
        if (OUT / name).is_file():
            lines.append(f"![accuracy against effective batch, ×{width:g}, {epochs} epochs]({name})")
    text = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "README.md").write_text(text)
    return text


if __name__ == "__main__":
    import json

    report([json.loads(f.read_text()) for f in sorted(OUT.glob("*.json"))])
