"""Comparing runs: one table row per run, plus plots of test accuracy and loss against epoch and wall time
(`alexdist compare`, commands/compare.py).

Both sources, run directories and W&B, produce the same RunRecord (flat config, summary, test history) and go
through one row-building function, so the same runs give the same table either way. A run without a final
summary is shown as `running` while its metrics still move, else `died`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alexdist.config import flatten
from alexdist.fileio import read_jsonl

STALE_AFTER_S = 600  # a run whose metrics have not moved for this long, with no summary, has died

COLUMNS = [
    ("run", "run"), ("model", "model"), ("strategy", "strategy"), ("world_size", "procs"),
    ("precision", "precision"), ("effective_batch", "eff. batch"), ("best_acc", "best acc"), ("selected_on", "on"),
    ("best_epoch", "best epoch"), ("test_at_best", "test acc there"), ("final_test_acc", "final test acc"),
    ("images_per_s", "img/s"), ("wall_time_s", "wall (s)"), ("time_to_target_s", "to target (s)"),
    ("status", "status"),
]
# Not shown as "differing" columns: run bookkeeping, and what the fixed columns already show.
IGNORED_CONFIG = ("output_dir", "name", "tracking.", "data.cache_dir", "checkpoint.", "model.name", "precision",
                  "distributed.strategy")


@dataclass
class RunRecord:
    """What a run recorded, whatever the source."""

    config: dict  # flattened recipe, e.g. {"model.name": ..., "train.batch_size": ...}
    summary: dict  # the run's summary (empty while running or after a crash)
    history: list[dict] = field(default_factory=list)  # test evaluations: epoch, step, acc, loss, elapsed_s
    finished_writing: bool = True  # False if the source says the process may still be running
    val_history: list[dict] = field(default_factory=list)  # validation evaluations (data.val_split), same keys


def from_run_dir(path: str | Path, now: float | None = None) -> RunRecord:
    path = Path(path)
    config = flatten(yaml.safe_load((path / "config.yaml").read_text()) or {})
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    history, val_history, last_event = [], [], 0.0
    metrics = path / "metrics.jsonl"
    for e in read_jsonl(metrics) if metrics.is_file() else []:
        if e.get("event") in ("test", "val"):
            (history if e["event"] == "test" else val_history).append(
                {**{k: e.get(k) for k in ("epoch", "step", "acc", "loss", "elapsed_s")},
                 "partial": bool(e.get("partial_epoch"))})
    if metrics.is_file():
        last_event = metrics.stat().st_mtime
    # A summary older than the last metrics line belongs to an earlier attempt (the run was resumed since).
    if summary and (path / "summary.json").stat().st_mtime + 1 < last_event:
        summary = {k: v for k, v in summary.items() if k != "status"}
    recent = (now or time.time()) - last_event < STALE_AFTER_S
    return RunRecord(config, summary, history, finished_writing=not recent, val_history=val_history)


def from_wandb_records(records: list[dict]) -> list[RunRecord]:
    """RunRecords from W&B's own transaction records (`wandb leet inspect --json RUN_DIR`, one dict per line).

    The records of a resumed run (several offline run directories with one run id) merge into one run.
    """
    runs: dict[str, dict] = {}
    order: list[str] = []
    current = None
    for rec in records:
        kind = rec.get("type")
        if kind == "run":
            current = rec["run"]["run_id"]
            if current not in runs:
                runs[current] = {"config": {}, "summary": {}, "history": {}, "exited": False}
                order.append(current)
        if current is None:
            continue
        r = runs[current]
        if kind == "config":
            for k, v in rec["config"].get("update", {}).items():
                if not k.startswith("_"):
                    r["config"][k] = v
        elif kind == "history":
            item = rec["history"]["item"]
            r["history"].setdefault(item["_step"], {}).update(item)
        elif kind == "summary":
            r["summary"].update({k: v for k, v in rec["summary"].get("update", {}).items() if not k.startswith("_")})
        elif kind == "exit":
            r["exited"] = True
    out = []
    for run_id in order:
        r = runs[run_id]
        hist = [h for _, h in sorted(r["history"].items())]
        out.append(_record_from_wandb(r["config"], r["summary"], hist, finished=r["exited"]))
    return out


def from_wandb_api(path: str, group: str | None = None, tag: str | None = None,
                   sweep: str | None = None) -> list[RunRecord]:
    """RunRecords from W&B's public API (needs the network and a login); `sweep`: that sweep's runs only."""
    import wandb

    filters: dict = {}
    if group:
        filters["group"] = group
    if tag:
        filters["tags"] = {"$in": [tag]}
    api = wandb.Api()
    runs = api.sweep(f"{path}/{sweep}").runs if sweep else api.runs(path, filters=filters)
    out = []
    for run in runs:
        hist = list(run.scan_history(keys=["_step", "epoch", "test/acc", "test/loss", "test/elapsed_s"]))
        hist += list(run.scan_history(keys=["_step", "epoch", "val/acc", "val/loss", "val/elapsed_s"]))
        summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
        out.append(_record_from_wandb(dict(run.config), summary, hist, finished=run.state != "running"))
    return out


def _record_from_wandb(config: dict, summary: dict, history: list[dict], finished: bool) -> RunRecord:
    # alexdist logs the recipe flattened plus "run.*" facts (world size, strategy, ...) into the W&B config.
    recipe = {k: v for k, v in config.items() if not k.startswith("run.")}
    facts = {k[4:]: v for k, v in config.items() if k.startswith("run.")}

    def evaluations(split: str) -> list[dict]:
        return [{"epoch": h.get("epoch"), "step": h.get("_step"), "acc": h[f"{split}/acc"],
                 "loss": h.get(f"{split}/loss"), "elapsed_s": h.get(f"{split}/elapsed_s"),
                 "partial": bool(h.get(f"{split}/partial_epoch"))}
                for h in sorted(history, key=lambda h: h.get("_step", 0)) if h.get(f"{split}/acc") is not None]

    return RunRecord(recipe, {**facts, **summary}, evaluations("test"), finished_writing=finished,
                     val_history=evaluations("val"))


def _epoch_history(history: list[dict]) -> list[dict]:
    """Evaluations at epoch ends, plus a final mid-epoch one (a run stopped at train.max_steps). A mid-epoch
    evaluation that a resumed run went past is history W&B keeps but metrics.jsonl drops: dropped here too."""
    return [e for i, e in enumerate(history) if not e.get("partial") or i == len(history) - 1]


def build_row(rec: RunRecord, target_acc: float | None = None) -> dict:
    """The one table row of a run, from any source. The run's best is chosen on validation when it has a split
    (data.val_split), else on test (then the figure is optimistic); `test acc there` is the test accuracy of the
    chosen epoch."""
    c, s, h = rec.config, rec.summary, _epoch_history(rec.history)
    chosen = _epoch_history(rec.val_history) or h
    target = target_acc if target_acc is not None else c.get("tracking.time_to_acc", c.get("tracking.target_acc"))
    best = max(chosen, key=lambda e: e["acc"]) if chosen else None  # the first of equals, as training chooses
    reached = next((e for e in chosen if target is not None and e["acc"] >= target), None)
    at_best = next((e for e in h if best and e["step"] == best["step"]), None)
    status = s.get("status") or ("running" if not rec.finished_writing else "died")
    return {
        "run": Path(str(c.get("output_dir", "?"))).name,
        "model": c.get("model.name"),
        "strategy": s.get("strategy") or c.get("distributed.strategy"),
        "world_size": s.get("world_size"),
        "precision": c.get("precision"),
        "effective_batch": s.get("effective_batch"),
        "best_acc": best["acc"] if best else None,
        "selected_on": ("val" if rec.val_history else "test") if best else None,
        "best_epoch": best["epoch"] if best else None,
        "test_at_best": at_best["acc"] if at_best else None,
        "final_test_acc": h[-1]["acc"] if h else None,
        "images_per_s": s.get("images_per_s"),
        "wall_time_s": s["train_time_s"] if s.get("train_time_s") is not None else (
            h[-1]["elapsed_s"] if h else None),
        "time_to_target_s": reached["elapsed_s"] if reached else None,
        "status": status,
    }


def differing_config(records: list[RunRecord], limit: int = 6) -> list[str]:
    """Recipe keys that all runs have but that differ between them: what the comparison is about."""
    if len(records) < 2:
        return []
    shared = set.intersection(*(set(r.config) for r in records))
    keys = [k for k in sorted(shared) if not k.startswith(IGNORED_CONFIG)
            and len({json.dumps(r.config[k], sort_keys=True) for r in records}) > 1]
    return keys[:limit]


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}" if v <= 1.0 else f"{v:,.1f}"
    return str(v)


def markdown(rows: list[dict], extra: list[str]) -> str:
    cols = [(k, label) for k, label in COLUMNS] + [(k, k) for k in extra]
    lines = ["| " + " | ".join(label for _, label in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


def plot(records: list[RunRecord], rows: list[dict], out_dir: str | Path) -> list[Path]:
    """test_{acc,loss}_vs_{epoch,time}.png, one line per run, 1000x600 px."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, ylabel in (("acc", "test accuracy"), ("loss", "test loss")):
        for xkey, xlabel in (("epoch", "epoch"), ("elapsed_s", "training wall time (s)")):
            fig, ax = plt.subplots(figsize=(10, 6), dpi=100)
            for rec, row in zip(records, rows, strict=True):
                pts = [(e[xkey], e[metric]) for e in _epoch_history(rec.history)
                       if e.get(xkey) is not None and e.get(metric) is not None]
                if pts:
                    xs, ys = zip(*pts, strict=False)
                    ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5,
                            label=f"{row['run']} ({row['model']}, {row['strategy']}, {row['world_size']}p)")
            ax.set_xlabel(xlabel, fontsize=12)
            ax.set_ylabel(ylabel, fontsize=12)
            ax.set_title(f"{ylabel} vs {xlabel}", fontsize=13)
            ax.grid(alpha=0.3)
            if metric == "loss":
                ax.set_yscale("log")
            ax.legend(fontsize=9, loc="best")
            fig.tight_layout()
            path = out_dir / f"test_{metric}_vs_{'epoch' if xkey == 'epoch' else 'time'}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written


def table(records: list[RunRecord], sort: str = "best_acc", ascending: bool = False,
          target_acc: float | None = None) -> tuple[list[dict], list[RunRecord], list[str]]:
    """(rows sorted by `sort`, runs without a value last; the records in the same order; the config keys that
    differ between the runs, each filled into every row)."""
    rows = [build_row(r, target_acc) for r in records]
    known = sorted((i for i in range(len(rows)) if rows[i][sort] is not None),
                   key=lambda i: rows[i][sort], reverse=not ascending)
    order = known + [i for i in range(len(rows)) if rows[i][sort] is None]  # unknown values last
    rows, records = [rows[i] for i in order], [records[i] for i in order]
    extra = differing_config(records)
    for row, rec in zip(rows, records, strict=False):
        row.update({k: rec.config.get(k) for k in extra})
    return rows, records, extra
