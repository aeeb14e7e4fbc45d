"""eval.val_checks (training/val_checks.py): the validation split evaluated inside an epoch, so that the step at
which a run reaches its target is known to a fraction of an epoch. In-process runs of a few steps on digits (one
process, 2 micro-batches a step so that the noise scale is measured): the evaluations leave the training bit for
bit the same, follow the step number through a stop and a resume, and bracket the target's crossing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import in_this_process, read_jsonl, summary, train_here

from alexdist.training.val_checks import interpolate_crossing, is_check_step

# 40 steps an epoch (32 images a step); 20 evaluations an epoch: after steps 2, 4, 6, ...
TINY = ["data.source=digits", "data.val_split=0.1", "model.width_mult=0.25", "train.epochs=1", "train.max_steps=7",
        "train.batch_size=16", "train.grad_accum=2", "train.eval_batch_size=180", "train.log_every=1",
        "tracking.wandb=false", "eval.confusion_png=false"]
CHECKS = ["eval.val_checks.per_epoch=20"]


def _train(out: Path, overrides: list[str], cache_dir: Path, fault: str | None = None) -> dict:
    """One in-process run (one rank, no process group), as tests/e2e/test_smoke.py's; its summary."""
    env = {"ALEXDIST_CACHE": str(cache_dir), **({"ALEXDIST_FAULT": fault} if fault else {})}
    with in_this_process(**env):
        return train_here("quickstart", TINY + overrides + [f"output_dir={out}"])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _checks(out: Path) -> list[tuple[int, float, float]]:
    return [(e["step"], e["acc"], e["loss"]) for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "val_check"]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """Without in-epoch evaluations; with them; with them, stopped at a step that evaluates and resumed."""
    root = tmp_path_factory.mktemp("val-checks")
    out = {name: root / name for name in ("plain", "checked", "resumed")}
    _train(out["plain"], [], cache_dir)
    _train(out["checked"], CHECKS, cache_dir)
    stopped = _train(out["resumed"], CHECKS, cache_dir, fault="stop:4")
    assert stopped["status"] == "stopped" and stopped["steps"] == 4
    _train(out["resumed"], CHECKS, cache_dir)
    return out


def test_in_epoch_evaluations_leave_the_weights_bn_statistics_and_losses_bit_identical(runs):
    """Evaluation runs in eval mode under no_grad: no dropout draw, no BatchNorm statistics update, no change to
    the data order or the augmentation's random numbers. Every tensor of the final weights (BatchNorm's running
    statistics included) and every step's loss equal those of the run that never evaluates inside the epoch."""
    assert [c[0] for c in _checks(runs["checked"])] == [2, 4, 6] and _checks(runs["plain"]) == []
    assert _same_weights(runs["plain"], runs["checked"])
    losses = {name: [(e["step"], e["loss"]) for e in read_jsonl(runs[name] / "metrics.jsonl") if e["event"] == "step"]
              for name in ("plain", "checked")}
    assert len(losses["plain"]) == 7 and losses["plain"] == losses["checked"]


def test_a_stop_at_an_evaluating_step_leaves_its_evaluation_to_the_resumed_run_and_the_schedule_holds(runs):
    """The stop request at step 4 checkpoints without evaluating; the resumed run evaluates those weights first,
    then after steps 6 and its end: the same evaluations, with the same figures, as the uninterrupted run."""
    assert _checks(runs["resumed"]) == _checks(runs["checked"])
    assert _same_weights(runs["checked"], runs["resumed"])


def _epoch_events(out: Path) -> list[tuple[str, int, bool]]:
    return [(e["event"], e["step"], bool(e.get("partial_epoch"))) for e in read_jsonl(out / "metrics.jsonl")
            if e["event"] in ("train", "val", "test")]


def test_a_capped_run_relaunched_keeps_its_last_evaluation_and_a_larger_cap_drops_it_as_the_epoch_goes_on(
        runs, tmp_path, cache_dir):
    """train.max_steps=7 ends mid-epoch with an evaluation at step 7. Relaunched with the same cap, the run ends
    at once and logs nothing again: its last figures stay beside summary.json's. With a larger cap the epoch goes
    on, as if never capped: the evaluation at step 7 goes and the new end evaluates."""
    out = tmp_path / "plain"
    shutil.copytree(runs["plain"], out)
    last = [("train", 7, True), ("val", 7, True), ("test", 7, True)]
    assert _epoch_events(out) == last
    again = _train(out, [], cache_dir)
    assert again["steps"] == 7 and _epoch_events(out) == last
    assert again["final_test_acc"] == next(e["acc"] for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "test")
    assert _train(out, ["train.max_steps=9"], cache_dir)["steps"] == 9
    assert _epoch_events(out) == [("train", 9, True), ("val", 9, True), ("test", 9, True)]


def test_val_loss_sits_beside_accuracy_with_the_noise_scales_two_terms_and_their_window(runs):
    events = [e for e in read_jsonl(runs["checked"] / "metrics.jsonl") if e["event"] == "val_check"]
    for e in events:
        assert 0 < e["acc"] <= 1 and e["loss"] > 0 and e["step_in_epoch"] == e["step"]
        assert {"noise_scale", "grad_sq", "grad_trace", "noise_window_examples"} <= e.keys()


def test_the_target_stops_the_run_at_the_evaluation_that_reaches_it_with_the_crossing_bracketed(tmp_path, cache_dir):
    """A target the first epoch passes: without in-epoch evaluations the run learns it at the epoch's end; with
    them, at the first evaluation at or above it, and summary.json holds the bracket (the evaluation before and
    that one), the interpolated step inside it, and the noise scale's terms there."""
    overrides = CHECKS + ["train.max_steps=30", "train.stop_at_acc=0.3", "tracking.time_to_acc=0.3"]
    s = _train(tmp_path / "run", overrides, cache_dir)
    checks = _checks(tmp_path / "run")
    reached = next(c for c in checks if c[1] >= 0.3)
    assert s["status"] == "target_reached" and s["steps"] == reached[0] == checks[-1][0]
    crossing = s["target_crossing"]
    before = checks[-2] if len(checks) > 1 else None
    assert crossing["bracket"] == [before[0] if before else 0, reached[0]]
    assert crossing["bracket"][0] <= crossing["interpolated_step"] <= crossing["bracket"][1]
    assert crossing["acc"][1] == reached[1] and crossing["loss"][1] == reached[2]
    assert crossing["noise_scale"]["noise_window_examples"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["target_crossing"] == crossing
    assert summary(tmp_path / "run")["epoch_to_target"] == 1
    # The same command again ends at once and keeps the figures of the evaluation that ended the run.
    events = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    again = _train(tmp_path / "run", overrides, cache_dir)
    assert again["status"] == "target_reached" and again["steps"] == s["steps"]
    kept = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    for kind in ("train", "val", "test"):
        assert [e for e in kept if e["event"] == kind] == [e for e in events if e["event"] == kind], kind


def test_the_crossing_is_interpolated_linearly_in_accuracy_between_the_bracketing_evaluations():
    c = interpolate_crossing([100, 0.90, 0.4], [200, 0.98, 0.2], 0.96)
    assert c["interpolated_step"] == pytest.approx(175) and c["bracket"] == [100, 200]
    assert c["acc"] == [0.90, 0.98] and c["loss"] == [0.4, 0.2] and c["target"] == 0.96
    assert interpolate_crossing([100, 0.90, 0.4], [200, 0.96, 0.2], 0.96)["interpolated_step"] == 200
    first = interpolate_crossing(None, [50, 0.97, 0.1], 0.96)  # no evaluation before: all that is known
    assert first["bracket"] == [0, 50] and first["interpolated_step"] == 50


@pytest.mark.parametrize("steps, per_epoch, want", [(100, 8, [13, 25, 38, 50, 63, 75, 88]), (6, 8, [1, 2, 3, 4, 5]),
                                                    (421, 1, []), (7, 7, [1, 2, 3, 4, 5, 6])])
def test_the_evaluating_steps_spread_evenly_over_the_epoch_and_every_step_when_it_is_short(steps, per_epoch, want):
    """n - 1 steps inside the epoch (its end evaluates anyway), every step where the epoch has fewer than n."""
    assert [k for k in range(1, steps + 1) if is_check_step(k, steps, per_epoch)] == want


def test_val_checks_that_the_recipe_cannot_serve_are_refused_as_it_loads_before_its_run_is_touched(runs, tmp_path,
                                                                                                    cache_dir):
    """No validation split, or `within` without a target: both follow from the recipe alone, so they are one line
    at load_recipe, before a run takes its lock, rewrites config.yaml or truncates metrics.jsonl on a resume."""
    import shutil

    from alexdist.config import load_recipe
    from alexdist.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^eval.val_checks.per_epoch=20 .*set data.val_split \(e.g. 0.1\)"):
        load_recipe("quickstart", TINY + CHECKS + ["data.val_split=null"])
    run = tmp_path / "run"
    shutil.copytree(runs["checked"], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="^eval.val_checks.within starts .* set tracking.time_to_acc"):
        _train(run, CHECKS + ["eval.val_checks.within=0.01"], cache_dir)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_with_a_margin_the_epoch_evaluates_only_once_an_accuracy_is_within_it_of_the_target():
    """eval.val_checks.within: the latest selection evaluation (in the checkpoint, the same on every rank) opens
    the in-epoch evaluations; an evaluation already done at this step (the resumed run's) is not repeated."""
    from types import SimpleNamespace

    from alexdist.checkpoint.state import TrainState
    from alexdist.config import load_recipe
    from alexdist.training.val_checks import check_due

    recipe = load_recipe("quickstart", ["eval.val_checks.per_epoch=4", "eval.val_checks.within=0.01",
                                        "train.stop_at_acc=0.98", "data.val_split=0.1"])
    run = SimpleNamespace(recipe=recipe, batches=SimpleNamespace(steps_per_epoch=40),
                          state=TrainState(global_step=50, step_in_epoch=10))
    assert not check_due(run)  # no evaluation yet
    run.state.last_selection = [40, 0.969, 0.2]
    assert not check_due(run)  # 1.1 points below
    run.state.last_selection = [40, 0.9705, 0.2]
    assert check_due(run)
    run.state.step_in_epoch, run.state.global_step = 11, 51
    assert not check_due(run)  # not one of the epoch's evaluating steps (10, 20, 30)
    run.state.step_in_epoch, run.state.global_step, run.state.last_selection = 20, 60, [60, 0.975, 0.1]
    assert not check_due(run)  # done at this step already


def _selection_run(state, **overrides):
    """What note_selection reads, without a model: the recipe, the state, a log that keeps what it is told."""
    from types import SimpleNamespace

    from alexdist.config import load_recipe

    said = []
    log = SimpleNamespace(event=lambda *a, **k: said.append(("event", a, k)), say=said.append)
    recipe = load_recipe("quickstart", [f"{k}={v}" for k, v in overrides.items()])
    return SimpleNamespace(recipe=recipe, state=state, noise=None, log=log, t_start=0.0), said


def test_a_checkpoint_that_reached_its_target_before_crossings_were_recorded_records_no_bogus_crossing():
    """A checkpoint from before the crossing was recorded: the time to the target is set, no crossing, no latest
    evaluation. Later evaluations at or above the target (after a dip too) are not a first crossing: no bracket
    [0, step] is made up, and the time stays the one measured."""
    from alexdist.checkpoint.state import TrainState
    from alexdist.training.val_checks import note_selection

    state = TrainState(global_step=300, time_to_target_s=12.5, epoch_to_target=3)
    run, said = _selection_run(state, **{"tracking.time_to_acc": 0.97})
    for step, acc in [(300, 0.975), (400, 0.965), (500, 0.98)]:
        state.global_step = step
        note_selection(run, 5, acc, 0.1)
    assert state.target_crossing is None and (state.time_to_target_s, state.epoch_to_target) == (12.5, 3)
    assert not [s for s in said if s[0] == "event"]


def test_a_target_changed_on_resume_is_crossed_anew_and_one_already_passed_records_none():
    """The crossing keeps its target: resumed with a higher tracking.time_to_acc, the old crossing and time are
    dropped and the new target's are recorded, bracketed by the evaluations around it; lowered under an accuracy
    the previous evaluation had already reached, its crossing lies at an unknown step: none is recorded."""
    from alexdist.checkpoint.state import TrainState
    from alexdist.training.val_checks import interpolate_crossing, note_selection

    def crossed_097():
        return TrainState(global_step=300, last_selection=[200, 0.972, 0.2], time_to_target_s=9.0, epoch_to_target=2,
                          target_crossing=interpolate_crossing([100, 0.96, 0.3], [200, 0.972, 0.2], 0.97))

    state = crossed_097()
    run, said = _selection_run(state, **{"tracking.time_to_acc": 0.98})
    note_selection(run, 3, 0.975, 0.15)
    assert state.target_crossing is None and state.time_to_target_s is None
    assert any("the target is now 0.98, not 0.97" in s for s in said if isinstance(s, str))
    state.global_step = 400
    note_selection(run, 4, 0.985, 0.1)
    assert state.target_crossing["target"] == 0.98 and state.target_crossing["bracket"] == [300, 400]
    assert state.epoch_to_target == 5 and state.time_to_target_s is not None
    state = crossed_097()
    run, _ = _selection_run(state, **{"tracking.time_to_acc": 0.96})
    note_selection(run, 3, 0.975, 0.15)
    assert state.target_crossing is None and state.time_to_target_s is None
    state = crossed_097()  # the same target: the crossing stays
    run, _ = _selection_run(state, **{"tracking.time_to_acc": 0.97})
    note_selection(run, 3, 0.975, 0.15)
    assert state.target_crossing["bracket"] == [100, 200] and state.time_to_target_s == 9.0


def test_a_dip_below_the_target_and_back_keeps_the_first_crossing():
    """Noisy validation near the target: 0.48, 0.52 (the crossing), 0.49, 0.53. The crossing stays the first one,
    bracketed by steps 100 and 200, and is logged once."""
    from alexdist.checkpoint.state import TrainState
    from alexdist.training.val_checks import note_selection

    state = TrainState()
    run, said = _selection_run(state, **{"tracking.time_to_acc": 0.5})
    for step, acc in [(100, 0.48), (200, 0.52), (300, 0.49), (400, 0.53)]:
        state.global_step = step
        note_selection(run, 1, acc, 0.1)
    assert state.target_crossing["bracket"] == [100, 200]
    assert len([s for s in said if s[0] == "event"]) == 1
