"""bn's tuning per batch in the steps-to-target study (benchmarks/study_tuning.py, `recipes.py tune`): successive
halving on validation accuracy, a trial at the target winning by fewer steps, rungs as relaunches of the same run
with a larger train.max_steps, a stopped tune resuming from its file, and the winners' seeds grid."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import ROOT, fake_study_launcher

sys.path.insert(0, str(ROOT / "benchmarks"))

BATCH = 8192  # budget 34 epochs x 6 steps = 204: rungs on epoch ends: 48, 102, 204

# A stand-in for the launcher: the trial (its rule read from the run folder's name) plays plan.json's part. It
# resumes where its last summary.json left it, runs to train.max_steps (else the schedule's end: `finished`) or
# to plan["reach"] (`target_reached`, crossing there), logs a validation evaluation with plan["acc"][step] and a
# test one that ranks the other way round; `diverge` ends it as a diverged run does (an event, no summary.json);
# `stop_at` (a cap) stops its first attempt at that cap as a stop request does.
FAKE_TRIAL = """
import json, math, sys
from pathlib import Path
def arg(key, default=None):
    return next((a.split("=", 1)[1] for a in sys.argv if a.startswith(key + "=")), default)
out = Path(arg("output_dir"))
plan = json.loads((Path(sys.argv[0]).parent / "plan.json").read_text())
trial = plan[next(r for r in plan if out.name.endswith(f"-{r}-p2"))]
summary, metrics = out / "summary.json", out / "metrics.jsonl"
total = int(arg("train.epochs")) * (54000 // (int(arg("train.batch_size")) * 2 * int(arg("train.grad_accum"))))
cap = int(arg("train.max_steps", total))
def log(**event):
    with open(metrics, "a") as f:
        f.write(json.dumps({"epoch": 1, "loss": 0.1, **event}) + "\\n")
if trial.get("stop_at") == cap and not (out / "stopped-once").exists():
    (out / "stopped-once").write_text("")
    summary.write_text(json.dumps({"status": "stopped", "steps": 7}))
    print("exitcode  : 75", file=sys.stderr)
    sys.exit(1)
if trial.get("diverge"):
    log(event="diverged", step=cap // 2, reason="loss is NaN")
    print("DivergedError: training diverged", file=sys.stderr)
    sys.exit(1)
reached = trial.get("reach") is not None and trial["reach"] <= cap
end = math.ceil(trial["reach"]) if reached else cap
acc = trial.get("acc", {}).get(str(end), 0.985 if reached else 0.5)
log(event="val", step=end, acc=acc)
log(event="test", step=end, acc=round(1.9 - acc, 4))
vals = [json.loads(x)["acc"] for x in metrics.read_text().splitlines() if json.loads(x)["event"] == "val"]
status = "target_reached" if reached else "max_steps" if cap < total else "finished"
crossing = {"interpolated_step": trial.get("reach"), "bracket": [end - 3, end]} if reached else None
summary.write_text(json.dumps({"status": status, "steps": end, "epochs_run": 1, "best_val_acc": max(vals),
                               "final_val_acc": acc, "final_test_acc": round(1.9 - acc, 4),
                               "target_crossing": crossing}))
"""


def _trials(monkeypatch, tmp_path, plan: dict[int, dict]) -> list[list[str]]:
    """The fake launcher in place, the study writing under tmp_path; plan by index into TRIALS. The launches'
    arguments, in order."""
    import study_tuning

    (tmp_path / "plan.json").write_text(json.dumps({rule: plan.get(i, {}) for i, rule in
                                                   enumerate(study_tuning.TRIALS)}))
    return fake_study_launcher(tmp_path, monkeypatch, FAKE_TRIAL)


def _arg(args: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in args if a.startswith(key + "=")), None)


def _played(launches: list[list[str]]) -> list[tuple[str, str | None]]:
    """(trial's rule, its cap) of each launch."""
    return [(Path(_arg(a, "output_dir")).name[len(f"bn-b{BATCH}-"):-len("-p2")], _arg(a, "train.max_steps"))
            for a in launches]


# By rung: validation accuracy at 48, 102 and 204 steps; the last trial diverges. Rung 1 keeps 2, 1, 4, 5 (its
# test accuracy favours 0, which it drops); rung 2 keeps 1 and 4; 4 wins at the end.
HALVING = {0: {"acc": {"48": 0.90}}, 1: {"acc": {"48": 0.95, "102": 0.975, "204": 0.976}},
           2: {"acc": {"48": 0.96, "102": 0.965}}, 3: {"acc": {"48": 0.91}},
           4: {"acc": {"48": 0.94, "102": 0.970, "204": 0.978}}, 5: {"acc": {"48": 0.93, "102": 0.960}},
           6: {"acc": {"48": 0.92}}, 7: {"diverge": True}}


def test_the_halving_keeps_the_better_half_by_validation_accuracy_at_each_rung(tmp_path, monkeypatch):
    import study_tuning

    launches = _trials(monkeypatch, tmp_path, HALVING)
    t = study_tuning.TRIALS
    assert study_tuning.rung_steps(BATCH) == [48, 102, 204]
    assert study_tuning.tune(BATCH) == t[4]
    record = json.loads(study_tuning.tuning_path(BATCH).read_text())
    assert record["survivors"] == [[t[2], t[1], t[4], t[5]], [t[1], t[4]], [t[4]]] and record["winner"] == t[4]
    assert record["results"][t[7]]["0"]["status"] == "diverged" and record["results"][t[0]]["0"]["best_val_acc"] == 0.9
    assert [cap for _, cap in _played(launches)] == ["48"] * 8 + ["102"] * 4 + [None] * 2
    assert study_tuning.tune(BATCH) == t[4] and len(launches) == 14  # decided: nothing relaunched


def test_a_trial_that_reaches_the_target_wins_by_fewer_steps_and_ends_the_tune(tmp_path, monkeypatch):
    """Two trials reach 98 % before the first rung (at steps 40.5 and 30.2), one stands at 97.9 % there: the one
    with fewer steps wins at once, with its result file; no trial plays a later rung."""
    import study_tuning

    import recipes

    launches = _trials(monkeypatch, tmp_path, {1: {"acc": {"48": 0.979}}, 2: {"reach": 40.5}, 4: {"reach": 30.2},
                                               5: {"reach": 60.0, "acc": {"48": 0.97}}})
    t = study_tuning.TRIALS
    assert study_tuning.tune(BATCH) == t[4]
    record = json.loads(study_tuning.tuning_path(BATCH).read_text())
    assert record["survivors"] == [[t[4]]] and record["results"][t[2]]["0"]["crossing_step"] == 40.5
    assert not record["results"][t[5]]["0"]["reached"] and len(launches) == 8
    row = json.loads((recipes.OUT / f"{recipes.run_id('bn', BATCH, t[4])}.json").read_text())
    assert row["reached"] and row["crossing_step"] == 30.2


def test_a_rung_relaunches_the_same_run_with_a_larger_cap_that_the_recipe_accepts(tmp_path, monkeypatch):
    """The winner's three launches: one run folder, train.max_steps 48 then 102 after the rule's overrides (the
    recipe takes it), then none: the schedule's end, where its result file is written, and only there."""
    import study_tuning

    import recipes
    from alexdist.config import load_recipe

    launches = _trials(monkeypatch, tmp_path, HALVING)
    rule = study_tuning.TRIALS[4]
    row = tmp_path / "results" / f"{recipes.run_id('bn', BATCH, rule)}.json"
    recipes.run_one("bn", BATCH, rule, max_steps=48)
    assert not row.exists() and json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())["steps"] == 48
    study_tuning.tune(BATCH)
    mine = [a for a in launches if rule in _arg(a, "output_dir")]
    assert len(mine) == 3 and len({_arg(a, "output_dir") for a in mine}) == 1  # the first rung was not relaunched
    assert [_arg(a, "train.max_steps") for a in mine] == ["48", "102", None]
    second = mine[1]
    assert second.index("train.max_steps=102") > second.index("optim.lr=3.0")
    recipe = load_recipe(second[0], second[1:])
    assert recipe.train.max_steps == 102 and recipe.optim.lr == 3.0 and recipe.schedule.warmup_epochs == 1
    assert json.loads(row.read_text())["status"] == "finished"


def test_a_stopped_tune_resumes_without_relaunching_finished_rungs(tmp_path, monkeypatch):
    """Trial 4 is stopped in the second rung: the tune exits 75 with the first rung and the second's finished
    trials on disk; run again it relaunches the stopped trial and the rest, nothing that finished its rung."""
    import study_tuning

    import recipes

    t = study_tuning.TRIALS
    launches = _trials(monkeypatch, tmp_path, {**HALVING, 4: {**HALVING[4], "stop_at": 102}})
    monkeypatch.setattr(sys, "argv", ["recipes.py", "tune", "--batches", str(BATCH)])
    assert recipes.main() == 75
    record = json.loads(study_tuning.tuning_path(BATCH).read_text())
    assert all("0" in record["results"][r] for r in t) and record["winner"] is None
    assert [r for r in t if "1" in record["results"][r]] == [t[1], t[2]]
    first = len(launches)
    assert recipes.main() == 0
    assert _played(launches[first:]) == [(t[4], "102"), (t[5], "102"), (t[1], None), (t[4], None)]
    assert json.loads(study_tuning.tuning_path(BATCH).read_text())["winner"] == t[4]


def test_the_tuned_seeds_grid_runs_each_batchs_winner_under_three_seeds(tmp_path, monkeypatch, capsys):
    import study_tuning

    import recipes
    from alexdist.config import load_recipe

    monkeypatch.setattr(recipes, "OUT", tmp_path / "results")
    winners = {128: "lars-sqrt-lr0.3-wu1", 2048: "lars-sqrt-lr3-wu3"}
    for batch, rule in winners.items():
        study_tuning._save(study_tuning.tuning_path(batch), {"winner": rule})
    study_tuning._save(study_tuning.tuning_path(512), {"winner": None})  # a tune under way
    cells = recipes.grid("tuned-seeds")
    assert cells == [("bn", b, f"{winners[b]}-sd{s}" if s else winners[b]) for b in (128, 2048) for s in (0, 1, 2)]
    assert recipes.run_id(*cells[4]) == "bn-b2048-lars-sqrt-lr3-wu3-sd1-p2"
    args = recipes.command_args(*cells[4], "out")
    recipe = load_recipe(args[0], args[1:])
    assert recipe.train.seed == 1 and recipe.optim.lr == 3.0 and recipe.schedule.warmup_epochs == 3
    said = capsys.readouterr().out
    assert "batch 512: not tuned yet" in said and "batch 8192: not tuned yet" in said


def test_the_trials_span_two_decades_of_the_shipped_rules_lr_and_share_one_step_budget():
    import study_tuning

    import recipes

    lrs = {float(recipes.rule_overrides(r)[1].split("=")[1]) for r in study_tuning.TRIALS}
    assert len(study_tuning.TRIALS) >= 6 and recipes.SHIPPED["bn"] in study_tuning.TRIALS
    assert max(lrs) / min(lrs) == pytest.approx(100)
    assert {recipes.epoch_cap(8192, r) for r in study_tuning.TRIALS} == {34}


def test_a_trial_finished_elsewhere_stands_on_its_result_row_instead_of_blocking_the_tune(tmp_path, monkeypatch):
    """The shipped rule's run, finished by the main grid in another checkout: its result file is here, its run
    folder is not. The tune reads the row (launching nothing) rather than retrying a run that run_one skips."""
    import study_tuning

    import recipes

    launches = _trials(monkeypatch, tmp_path, {})
    rid = recipes.run_id("bn", BATCH, study_tuning.TRIALS[2])
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{rid}.json").write_text(json.dumps({
        "status": "finished", "steps": 204, "crossing_step": None,
        "curve": [{"step": 48, "val_acc": 0.91}, {"step": 96, "val_acc": 0.95}, {"step": 204, "val_acc": 0.97}]}))
    outcome = study_tuning.play_rung(BATCH, study_tuning.TRIALS[2], 102, capped=True)
    assert outcome is not None and outcome["best_val_acc"] == 0.95 and not outcome["reached"]
    assert launches == []


def _events(run: Path, *events: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": 1, **e}) + "\n" for e in events))


def test_a_run_past_the_rung_stands_on_its_evaluations_there_however_it_ended(tmp_path, monkeypatch):
    """bn's shipped-rule trial shares its run with the main grid: stopped past a rung, it is not relaunched with
    a cap below its checkpoint (which would evaluate off the protocol); diverged past a rung, it is ranked there
    on its accuracy, and counts as diverged only from the rung its divergence falls in."""
    import study_tuning

    import recipes

    monkeypatch.setattr(recipes, "OUT", tmp_path / "results")
    stopped, late = tmp_path / "stopped", tmp_path / "late"
    _events(stopped, {"event": "val", "step": 48, "acc": 0.95}, {"event": "val", "step": 60, "acc": 0.99,
                                                                 "partial_epoch": True})
    (stopped / "summary.json").write_text(json.dumps({"status": "stopped", "steps": 60}))
    got = study_tuning.standing(stopped, 48)
    assert got is not None and got["best_val_acc"] == 0.95 and not got["reached"]
    assert study_tuning.standing(stopped, 102) is None  # not there yet: resumed uncapped up to it
    _events(late, {"event": "val", "step": 48, "acc": 0.93}, {"event": "diverged", "step": 80})
    assert study_tuning.standing(late, 48)["status"] != "diverged"
    assert study_tuning.rank_key(study_tuning.standing(late, 48))[1] == 0.93
    assert study_tuning.standing(late, 102)["status"] == "diverged"


def test_rungs_recorded_at_other_steps_are_played_again(tmp_path, monkeypatch):
    import study_tuning

    _trials(monkeypatch, tmp_path, HALVING)
    study_tuning.tune(BATCH)
    monkeypatch.setattr(study_tuning, "RUNGS", (0.5, 0.75, 1.0))
    new = study_tuning.rung_steps(BATCH)
    assert new[0] != 48
    study_tuning.tune(BATCH)
    record = json.loads(study_tuning.tuning_path(BATCH).read_text())
    assert all(r["0"]["rung_step"] == new[0] for r in record["results"].values())


def test_a_seed_that_diverges_gets_a_result_row_and_counts_as_a_miss(tmp_path, monkeypatch):
    """A diverged run writes no summary.json: without a row it would be relaunched on every pass, diverge again,
    and vanish from the seeds table."""
    import study_tuning
    from steps_seeds import cells

    import recipes

    launches = _trials(monkeypatch, tmp_path, {7: {"diverge": True}})
    rule = study_tuning.TRIALS[7]
    recipes.run_one("bn", BATCH, rule)
    row = json.loads((recipes.OUT / f"{recipes.run_id('bn', BATCH, rule)}.json").read_text())
    assert (row["status"], row["steps"], row["reached"]) == ("diverged", 102, False)
    assert recipes.run_one("bn", BATCH, rule) is None and len(launches) == 1  # not run again
    (cell,) = cells([row], lambda recipe, batch: rule)
    assert (cell.seeds, cell.missed, cell.steps) == ([0], [0], [])
