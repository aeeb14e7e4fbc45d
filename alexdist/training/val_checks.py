"""The target's step, known to a fraction of an epoch (eval.val_checks): the validation split evaluated after steps
spread over each epoch, and the step at which the selection accuracy first reached the target interpolated
between the two evaluations that bracket it.

Every decision here follows from the step number and from accuracies every rank holds alike (each evaluation's
sums are all-reduced, so each rank divides the same totals): all ranks evaluate after the same steps. What the
schedule reads (the step in the epoch, the latest evaluation) is in the checkpoint, so a resumed run evaluates
after the same steps as an uninterrupted one. An evaluation runs in eval mode under no_grad, draws no random
numbers and leaves the data order alone: the training is bit for bit the same as without it
(tests/unit/test_val_checks.py).
"""

from __future__ import annotations

import time

from alexdist.checkpoint.state import TrainState
from alexdist.config.val_checks import recipe_target
from alexdist.training.run import Run


def is_check_step(step_in_epoch: int, steps_per_epoch: int, per_epoch: int) -> bool:
    """Whether the validation is evaluated after step `step_in_epoch` (1-based) of an epoch, besides its end: the
    steps ceil(j S / n) for j = 1 .. n - 1 (n = per_epoch, at most S: every step)."""
    s, n = steps_per_epoch, min(per_epoch, steps_per_epoch)
    k = step_in_epoch
    return 0 < k < s and k * n // s > (k - 1) * n // s


def target_of(run: Run) -> float | None:
    """The accuracy whose crossing is recorded: tracking.time_to_acc, else train.stop_at_acc."""
    return recipe_target(run.recipe)


def check_due(run: Run) -> bool:
    """Whether this step's in-epoch evaluation is due and not yet done (a stop request at its step leaves it owed
    to the resumed run, which then evaluates the same weights first)."""
    cfg, state = run.recipe.eval.val_checks, run.state
    if cfg.per_epoch == 1 or not is_check_step(state.step_in_epoch, run.batches.steps_per_epoch, cfg.per_epoch):
        return False
    last = state.last_selection
    if last is not None and last[0] == state.global_step:
        return False
    if cfg.within is None:
        return True
    return last is not None and last[1] >= target_of(run) - cfg.within


def interpolate_crossing(before: list[float] | None, after: list[float], target: float) -> dict:
    """Where the accuracy crossed `target` between two evaluations [step, accuracy, loss], `before` below it and
    `after` at or above: the step interpolated linearly in accuracy, and the bracket that holds it for certain.
    Without an earlier evaluation the bracket starts at step 0 and the step is the evaluation's own."""
    s1, a1, l1 = after
    if before is None:
        return {"target": target, "interpolated_step": float(s1), "bracket": [0, s1], "acc": [None, a1],
                "loss": [None, l1]}
    s0, a0, l0 = before
    frac = (target - a0) / (a1 - a0) if a1 > a0 else 1.0
    step = s0 + min(1.0, max(0.0, frac)) * (s1 - s0)
    return {"target": target, "interpolated_step": step, "bracket": [s0, s1], "acc": [a0, a1], "loss": [l0, l1]}


def note_selection(run: Run, epoch: int, acc: float, loss: float) -> None:
    """After every selection evaluation (in an epoch or at its end): the target's crossing (interpolated, with the
    noise scale there), tracking.time_to_acc's time, train.stop_at_acc's stop; then the latest evaluation.

    The crossing and the time are the first evaluation's at or above the target, recorded once, with the target
    they belong to (the crossing's `target`). A resume may change the target (tracking.time_to_acc, or
    train.stop_at_acc where time_to_acc is unset): what was recorded for the old one is dropped, and the new
    one's crossing and time are recorded where an evaluation first reaches it after an evaluation below it. A
    target the previous evaluation already met (one lowered under an accuracy reached) gets neither: its
    crossing lies somewhere before, at a step not known. A checkpoint from before crossings were recorded, whose
    target was reached (a time to it, or the stop), gets no crossing either: the target counts as reached."""
    state, recipe = run.state, run.recipe
    step = state.global_step
    target = target_of(run)
    _forget_another_target(run, target)
    first = bool(target) and acc >= target and not _reached_before(state, target)
    if first:
        crossing = interpolate_crossing(state.last_selection, [step, acc, loss], target)
        crossing["noise_scale"] = run.noise.terms() if run.noise else None
        state.target_crossing = crossing
        lo, hi = crossing["bracket"]
        run.log.event("target_crossing", step, epoch + 1, **crossing)
        run.log.say(f"alexdist: {state.selected_on} accuracy reached {target} between steps {lo} and {hi} "
                    f"(interpolated: step {crossing['interpolated_step']:.1f})")
    time_to = recipe.tracking.time_to_acc
    if first and time_to and state.time_to_target_s is None:  # time_to, where set, is the target
        state.time_to_target_s, state.epoch_to_target = time.time() - run.t_start, epoch + 1
    stop_at = recipe.train.stop_at_acc
    if stop_at and acc >= stop_at and not state.target_reached:
        state.target_reached = True
        run.log.say(f"alexdist: {state.selected_on} accuracy {acc:.4f} reached train.stop_at_acc={stop_at} at step "
                    f"{step}: stopping here")
    state.last_selection = [step, acc, loss]


def _forget_another_target(run: Run, target: float | None) -> None:
    """Drop the crossing and time recorded for a target other than this attempt's (changed on resume)."""
    state = run.state
    crossing = state.target_crossing
    if crossing is None or crossing.get("target") == target:
        return
    state.target_crossing, state.time_to_target_s, state.epoch_to_target = None, None, None
    run.log.say(f"alexdist: the target is now {target}, not {crossing.get('target')}: its crossing (step "
                f"{crossing['interpolated_step']:.1f}) no longer applies")


def _reached_before(state: TrainState, target: float) -> bool:
    """Whether an evaluation before this one met `target`: the latest one did, or the run reached its target
    without recording a crossing (a checkpoint from before crossings were recorded: the time to it, or the
    stop, is all it kept)."""
    if state.target_crossing is not None:  # recorded once: a dip below the target and back is no new crossing
        return True
    last = state.last_selection
    if last is not None and last[1] >= target:
        return True
    return state.target_crossing is None and (state.time_to_target_s is not None or state.target_reached)
