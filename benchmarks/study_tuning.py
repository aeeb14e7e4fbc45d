"""bn's lr and warmup tuned per batch (issue 40) by successive halving (Jamieson & Talwalkar 2016; Li et al.
2018): every trial trains to the first rung of the batch's step budget, the better half by validation accuracy
goes on to the next, and so on; a trial that reaches the target is done and ranks by its crossing step, fewer
first. Then the winner of each batch runs under SEEDS (the `tuned-seeds` grid of benchmarks/recipes.py).

    nice -n 19 .venv/bin/python benchmarks/recipes.py tune [--batches 128,512]

A trial is the study's run of its rule (same id and folder, so the shipped rule's trial is the `main` grid's
run); a rung relaunches it with train.max_steps at the rung, which resumes from the checkpoint the previous rung
left and continues into the same schedule (sized by the epoch cap), so the trial surviving to the last rung is
exactly the uncapped run and gets its result file there. Each trial's outcome at each rung, the survivors and the
winner are written to OUT/tuning/bn-b<batch>.json as soon as known: a stopped tune (exit 75) resumes without
relaunching a finished rung. Only validation figures rank trials.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import recipes as study
from alexdist.errors import STOPPED_EXIT_CODE

RECIPE = "bn"
# The shipped family (LARS, lr scaled by sqrt(batch / 128)) over two decades of the base lr, 0.1 to 10, so two
# decades at every batch, and two warmups. A low lr has nothing to warm up from: a 3-epoch warmup at 0.1 or 0.3
# would only delay training, so those try 1 epoch only; 8 trials halve evenly at ETA = 2 (8, 4, 2, one winner).
TRIALS = [f"lars-sqrt-lr{lr}-wu{wu}" for lr, wu in
          (("0.1", 1), ("0.3", 1), ("1", 1), ("1", 3), ("3", 1), ("3", 3), ("10", 1), ("10", 3))]
ETA = 2
# Rungs as fractions of the budget. The warmup is capped at 1/4 of the schedule (training/optim.py WARMUP_CAP),
# so at the first rung every trial has reached its peak lr.
RUNGS = (0.25, 0.5, 1.0)
FINAL = ("finished", "target_reached")


def budget(batch: int) -> int:
    """The batch's step budget: its epoch cap's optimizer steps (the same for every trial: none sets `ep`)."""
    return study.epoch_cap(batch, TRIALS[0]) * (study.TRAIN_IMAGES // batch)


def rung_steps(batch: int) -> list[int]:
    """The rungs on epoch ends, where the uncapped run evaluates too: a capped attempt's last evaluation (kept in
    its checkpoint's state: best accuracy, the target's crossing) is then one the uncapped run also makes."""
    per_epoch = study.TRAIN_IMAGES // batch
    return [max(1, round(budget(batch) * f / per_epoch)) * per_epoch for f in RUNGS]


def tuning_path(batch: int) -> Path:
    return study.OUT / "tuning" / f"{RECIPE}-b{batch}.json"


def tune(batch: int) -> str | None:
    """The batch's winning rule, the halving resumed from its file; None where a trial's rung is left to retry
    (its attempt crashed: the error is printed). Raises StudyStopped as run_one does, every rung finished before
    it on disk."""
    path = tuning_path(batch)
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(recipe=RECIPE, batch=batch, target=study.TARGET[RECIPE], eta=ETA, budget_steps=budget(batch),
                  rung_steps=rung_steps(batch), trials=TRIALS, survivors=[], winner=None)
    results = record.setdefault("results", {})
    alive, last = list(TRIALS), len(RUNGS) - 1
    for k, steps in enumerate(record["rung_steps"]):
        for rule in alive:
            if results.get(rule, {}).get(str(k), {}).get("rung_step") == steps:
                continue  # played at this step (a rung recorded at another, before the rungs moved, is replayed)
            outcome = play_rung(batch, rule, steps, capped=k < last)
            if outcome is None:
                return None
            results.setdefault(rule, {})[str(k)] = outcome
            _save(path, record)
        ranked = sorted(alive, key=lambda r: rank_key(results[r][str(k)]), reverse=True)  # stable: TRIALS' order
        # A trial at the target by this rung wins: the others' crossings lie past the rung, where each capped
        # attempt evaluates before it ends.
        done = k == last or results[ranked[0]][str(k)]["reached"]
        alive = ranked[:1] if done else ranked[:math.ceil(len(ranked) / ETA)]
        record["survivors"].append(alive)
        if done:
            break
    record["winner"] = alive[0]
    _save(path, record)
    return alive[0]


def play_rung(batch: int, rule: str, steps: int, capped: bool) -> dict | None:
    """The trial's outcome at the rung, its run launched (resumed) up to there unless it already got there or
    ended (reached the target, diverged); None if the attempt did not get there (a crash)."""
    run_dir = study.RUNS / study.run_id(RECIPE, batch, rule)
    if standing(run_dir, steps) is None:
        study.run_one(RECIPE, batch, rule, max_steps=steps if capped else None)
    outcome = standing(run_dir, steps)
    if outcome is None:
        print(f"{run_dir.name}: did not reach its rung at step {steps} (rerun to retry)", flush=True)
        return None
    return {**outcome, "rung_step": steps}


def standing(run_dir: Path, steps: int) -> dict | None:
    """Where the trial stands at `steps`, from its own files: its validation accuracy there (the trainer's best
    where its attempt ended there or before, else the best evaluation at or before the step), whether it reached
    the target by then and where; None while it has not got there."""
    s, events = _files(run_dir)
    status, ran = s.get("status"), s.get("steps") or 0
    # Past the rung however it ended (capped, stopped, diverged later: the run shared with the main grid): its
    # epoch-end evaluation at the rung is there. A relaunch capped below its checkpoint would evaluate off-protocol.
    covered = (status in FINAL or (status == "max_steps" and ran >= steps)
               or any(e["event"] == "val" and e["step"] == steps and not e.get("partial_epoch") for e in events))
    # A diverged run leaves no summary.json of its own (exit 6); relaunched it would resume into the same steps.
    diverged = not covered and any(e["event"] == "diverged" and e["step"] <= steps for e in events)
    if not (covered or diverged):
        return None
    reached = covered and status == "target_reached" and ran <= steps
    crossing = ((s.get("target_crossing") or {}).get("interpolated_step") or ran) if reached else None
    # The same evaluations for every trial (epoch ends and in-epoch checks up to the rung), however far it ran.
    best = max((e["acc"] for e in events if e["event"] in ("val", "val_check") and e["step"] <= steps), default=None)
    return {"status": "diverged" if diverged else status, "steps_run": ran, "reached": reached,
            "crossing_step": crossing, "best_val_acc": best}


def _files(run_dir: Path) -> tuple[dict, list[dict]]:
    """The run's summary.json and metrics.jsonl events; for a finished run whose folder is not here (another
    checkout ran it, or runs/ was cleaned), the same facts from its result row."""
    summary_path, metrics = run_dir / "summary.json", run_dir / "metrics.jsonl"
    row_path = study.OUT / f"{run_dir.name}.json"
    if not summary_path.is_file() and row_path.is_file():
        row = json.loads(row_path.read_text())
        crossing = {"interpolated_step": row["crossing_step"]} if row.get("crossing_step") else None
        events = [{"event": "val", "step": c["step"], "acc": c["val_acc"]} for c in row.get("curve", [])]
        if row["status"] == "diverged":  # as its metrics.jsonl says it (no summary.json)
            return {}, [*events, {"event": "diverged", "step": row["steps"]}]
        return {"status": row["status"], "steps": row["steps"], "target_crossing": crossing}, events
    s = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return s, [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []


def rank_key(outcome: dict) -> tuple[int, float]:
    """Larger is better: at the target (by fewer steps), then by validation accuracy, diverged last."""
    if outcome["reached"]:
        return 2, -outcome["crossing_step"]
    if outcome["status"] == "diverged":
        return 0, 0.0
    return 1, outcome["best_val_acc"] or 0.0


def _save(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)  # a stop mid-write leaves the previous record whole


def winner(batch: int) -> str | None:
    """The batch's tuned rule, once its halving has one."""
    path = tuning_path(batch)
    return json.loads(path.read_text()).get("winner") if path.is_file() else None


def tuned_seeds() -> list[tuple[str, int, str]]:
    """The `tuned-seeds` grid: bn at each tuned batch under its winner, with SEEDS (`-sd<seed>` run ids)."""
    cells = []
    for batch in study.BATCHES:
        if (rule := winner(batch)) is None:
            print(f"{RECIPE} at batch {batch}: not tuned yet (run `recipes.py tune` first)", flush=True)
            continue
        cells += [(RECIPE, batch, study.seeded(rule, seed)) for seed in study.SEEDS]
    return cells


def tune_all(batches: list[int]) -> int:
    """`recipes.py tune`: each batch in turn; exit 75 where the study was asked to stop."""
    for batch in batches:
        try:
            winner = tune(batch)
        except study.StudyStopped as stop:
            print(f"study stopped: {stop}", flush=True)
            return STOPPED_EXIT_CODE
        print(f"{RECIPE} at batch {batch}: " + (f"winner {winner}" if winner else "not decided (rerun to retry)"),
              flush=True)
    return 0
