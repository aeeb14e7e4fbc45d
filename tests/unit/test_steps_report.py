"""The steps-to-target study's arithmetic (benchmarks/steps_report.py, benchmarks/recipes.py): the critical-batch
fit, the scaling efficiency and the step budget a rule asks for."""

from __future__ import annotations

import json
import os
import sys

import pytest
from helpers import ROOT, fake_study_launcher

sys.path.insert(0, str(ROOT / "benchmarks"))
from steps_report import fit_critical_batch, fits, table

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


def test_the_fit_table_gives_a_critical_batch_beyond_the_measured_batches_as_a_bound_with_no_ratio():
    rows = [{**_row("a", b, 128_000 // b), "noise_scale": 300.0} for b in (128, 512, 2048)]  # perfect scaling
    cells = [c.strip() for c in fits(rows)[2].strip("|").split("|")]
    assert cells[2] == "> 2,048" and cells[3] == "300" and cells[4] == "—"


def test_a_rules_epoch_budget_raises_the_cap_at_every_batch_and_small_batches_keep_their_minimum():
    assert epoch_cap(2048, "sgd-sqrt-lr0.02-wu3-gc1") == 10
    assert epoch_cap(2048, "sgd-sqrt-lr0.02-wu3-gc1-ep20") == 20
    assert epoch_cap(8192, "sgd-sqrt-lr0.02-wu3-gc1") == 34  # 200 steps at 6 per epoch, past the 10-epoch minimum
    assert epoch_cap(8192, "sgd-sqrt-lr0.02-wu3-gc1-ep20") == 34
    args = command_args("vgg", 512, "sgd-sqrt-lr0.02-wu3-gc1-ep20", "out")
    assert "train.epochs=20" in args and "train.grad_clip=1.0" in args and not any("ep20" in a for a in args)


def test_the_study_trains_digits_without_flips_and_checks_the_target_inside_each_epoch():
    """Protocol 2 (issue 40): a mirrored digit is another symbol, so no flips; the validation split evaluated 8
    times an epoch from a point below the target; epoch-end checkpoints to resume from. Every override is a key
    the recipe knows."""
    from alexdist.config import load_recipe

    args = command_args("bn", 8192, "lars-sqrt-lr1-wu1", "out")
    assert "augment.flip=false" in args and "checkpoint.at_epoch_end=false" not in args
    recipe = load_recipe(args[0], args[1:])
    assert recipe.augment.flip is False and recipe.checkpoint.at_epoch_end
    assert (recipe.eval.val_checks.per_epoch, recipe.eval.val_checks.within) == (8, 0.01)



def test_the_seeds_grid_runs_each_cell_under_three_seeds_of_its_shipped_rule_and_the_seed_reaches_the_recipe():
    """Issue 40's seeds: a rule's `sd` is train.seed; the seeds grid gives each (recipe, batch) cell three runs of
    its own ids, under the rule the recipe ships."""
    from alexdist.config import load_recipe
    from recipes import SHIPPED, grid, run_id

    args = command_args("vgg", 2048, SHIPPED["vgg"] + "-sd2", "out")
    assert load_recipe(args[0], args[1:]).train.seed == 2
    base = command_args("vgg", 2048, SHIPPED["vgg"], "out")
    assert load_recipe(base[0], base[1:]).train.seed == 0
    cells = grid("seeds")
    assert len(cells) == 12 and len({run_id(*c) for c in cells}) == 12
    assert {(r, b) for r, b, _ in cells} == {(r, b) for r in ("vgg", "alexnet") for b in (128, 2048)}
    assert all(rule.rsplit("-sd", 1)[0] == SHIPPED[r] for r, _, rule in cells)

# A stand-in for `accelerate launch ... -m alexdist.train`, behaving as torchrun does: exit 1 for every failure, a
# stop's 75 included (the rank's code only in its report). Its attempts, in order: another process holds the run
# (refused, no summary.json); stopped on request (summary.json "stopped"); a crash (no new summary.json); done.
FAKE_LAUNCH = """
import json, sys
from pathlib import Path
out = Path(next(a for a in sys.argv if a.startswith("output_dir="))[len("output_dir="):])
n = len(list(out.glob("attempt-*")))
(out / f"attempt-{n}").write_text("")
def torchrun_failed(code):
    print(f"torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\\n  exitcode  : {code}", file=sys.stderr)
    sys.exit(1)
if n == 0:
    print(f"alexdist: error: output_dir {out} is held by another run (pid 4242)", file=sys.stderr)
    torchrun_failed(1)
if n == 1:
    (out / "summary.json").write_text(json.dumps({"status": "stopped", "steps": 96}))
    torchrun_failed(75)
if n == 2:
    print("ValueError: boom", file=sys.stderr)
    torchrun_failed(1)
crossing = {"target": 0.98, "interpolated_step": 190.5, "bracket": [187, 192], "acc": [0.979, 0.981],
            "loss": [0.07, 0.068], "noise_scale": {"noise_scale": 900.0, "grad_sq": 0.1, "grad_trace": 90.0,
                                                   "noise_window_examples": 65536}}
(out / "summary.json").write_text(json.dumps({"status": "target_reached", "steps": 192, "epochs_run": 8,
                                              "target_crossing": crossing}))
(out / "metrics.jsonl").write_text(json.dumps({"event": "val_check", "step": 192, "epoch": 8, "acc": 0.981,
                                               "loss": 0.068}) + "\\n")
"""

# Waits for the run's STOP file (what a stop request becomes), then stops as the trainer does under torchrun.
FAKE_STOPPABLE = """
import json, sys, time
from pathlib import Path
out = Path(next(a for a in sys.argv if a.startswith("output_dir="))[len("output_dir="):])
(out / "started").write_text("")
for _ in range(200):
    if (out / "STOP").exists():
        (out / "summary.json").write_text(json.dumps({"status": "stopped", "steps": 12}))
        print("exitcode  : 75", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.05)
print("RuntimeError: never asked to stop", file=sys.stderr)
sys.exit(1)
"""


def _fake_launcher(tmp_path, monkeypatch, text: str) -> list[list[str]]:
    return fake_study_launcher(tmp_path, monkeypatch, text)


def test_a_study_run_is_decided_by_its_summary_not_by_the_launchers_exit_code(tmp_path, monkeypatch, capsys):
    """Under torchrun every failure exits 1, a stop included. A refused attempt and a crash leave no summary.json
    of their own (the crash finds only the stopped attempt's): no result file, the run stays retryable, and the
    line printed is that attempt's error, not an earlier one's. The stopped attempt (summary.json "stopped")
    stops the study. The finished one gets its row: the crossing, all four attempts' wall time, the provenance;
    then a pass launches nothing. Every attempt has its line in attempts.jsonl, in the run's own folder."""
    import recipes

    launches = _fake_launcher(tmp_path, monkeypatch, FAKE_LAUNCH)
    item = ("bn", 2048, "lars-sqrt-lr1-wu1")
    assert recipes.run_one(*item) is None
    assert "is held by another run" in capsys.readouterr().out and not (tmp_path / "results").exists()
    with pytest.raises(recipes.StudyStopped, match="stopped at step 96"):
        recipes.run_one(*item)
    assert not (tmp_path / "results").exists()
    assert recipes.run_one(*item) is None
    said = capsys.readouterr().out
    assert "ValueError: boom" in said and "held by another run" not in said and not (tmp_path / "results").exists()
    row = recipes.run_one(*item)
    assert launches[0] == launches[3] and f"output_dir={tmp_path / 'runs' / row['id']}" in launches[0]
    assert row["protocol"] == 2 and row["id"].endswith("-p2") and row["attempts"] == 4 and row["reached"]
    assert row["crossing_step"] == 190.5 and row["crossing_bracket"] == [187, 192] and row["error"] is None
    assert row["noise_at_crossing"]["noise_scale"] == 900.0 and row["curve"][0]["val_loss"] == 0.068
    assert row["torch"] and row["cpu"] and row["aten_cpu_capability"] and len(row["git_commit"].split("+")[0]) == 40
    assert "aten_cpu_capability_env" in row
    lines = (tmp_path / "runs" / row["id"] / "attempts.jsonl").read_text().splitlines()
    assert [json.loads(x)["status"] for x in lines] == [None, "stopped", None, "target_reached"]
    assert recipes.run_one(*item) is None and len(launches) == 4


def test_a_signal_to_the_study_stops_its_run_through_the_stop_file_and_ends_the_study(tmp_path, monkeypatch):
    """SIGTERM to the study while a run trains: passed on as the run's STOP file (its ranks checkpoint, no
    launcher deadline), the study waits for the launcher, records the attempt with its signal, and exits 75
    without starting the next run."""
    import signal
    import threading
    import time

    import recipes

    launches = _fake_launcher(tmp_path, monkeypatch, FAKE_STOPPABLE)
    first = tmp_path / "runs" / recipes.run_id("bn", 2048, "lars-sqrt-lr1-wu1")

    def signal_when_started() -> None:
        for _ in range(400):
            if (first / "started").exists():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.025)

    monkeypatch.setattr(sys, "argv", ["recipes.py", "run", "--only",
                                      "bn:2048:lars-sqrt-lr1-wu1,bn:512:lars-sqrt-lr1-wu1"])
    before = signal.signal(signal.SIGTERM, lambda *a: None)  # should the study not take it, pytest lives on
    try:
        threading.Thread(target=signal_when_started, daemon=True).start()
        assert recipes.main() == 75
    finally:
        signal.signal(signal.SIGTERM, before)
    assert len(launches) == 1 and not (tmp_path / "results").exists()
    line = json.loads((first / "attempts.jsonl").read_text())
    assert line["signal"] == "SIGTERM" and line["status"] == "stopped" and line["returncode"] == 1


def test_the_report_reads_the_newest_protocol_and_shows_the_interpolated_crossing_with_its_bracket():
    from steps_report import fits, latest_protocol, noise_of

    old = [_row("a", 128, 4000), _row("a", 512, 1000)]
    new = [{**_row("a", b, s), "protocol": 2, "crossing_step": c, "crossing_bracket": [lo, s],
            "noise_at_crossing": {"noise_scale": n}}
           for b, s, c, lo, n in [(128, 4000, 3950.4, 3900, 800.0), (512, 1000, 987.5, 975, 1200.0)]]
    assert latest_protocol(old) == old and latest_protocol(old + new) == new
    lines = {c[3]: c for c in ([x.strip() for x in line.split("|")] for line in table(new)[2:])}
    assert lines["128"][4] == "3950 (3900-4000)" and lines["512"][8] == f"{3950.4 / 987.5 / 4:.2f}"
    assert noise_of(new[0]) == 800.0 and noise_of(old[0]) is None
    assert "at the target's crossing" in fits(new)[0] and "at their end" in fits(old)[0]
