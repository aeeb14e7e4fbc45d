"""The end of an epoch (or of an attempt mid-epoch): evaluate, record, report, checkpoint.

- evaluate: the model as it will be saved on the validation split (data.val_split) and on the test set; the EMA
  beside it (train.ema_decay);
- record: the selection accuracy (validation with a split, else test; the EMA's with train.ema_is_model) picks
  the best epoch, tracking.time_to_acc's time and train.stop_at_acc's stop; the epoch is marked done;
- inside an epoch (eval.val_checks): the validation split alone, deciding the same (check_validation);
- report: the `train`, `val` and `test` events (metrics.jsonl and the trackers) and the epoch's line;
- the epoch-end checkpoint, which then records all of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from alexdist import faults
from alexdist.data.interface import EvalSet
from alexdist.distributed.collectives import broadcast_buffers
from alexdist.training.evaluation import Evaluation, evaluate_ranks
from alexdist.training.run import Run
from alexdist.training.val_checks import note_selection


@dataclass
class EpochEvaluation:
    """One epoch end's evaluations: test always; validation with a split; the EMA's beside each."""

    test: Evaluation
    val: Evaluation | None = None
    ema_test: Evaluation | None = None
    ema_val: Evaluation | None = None

    def selection(self, ema_is_model: bool) -> Evaluation:
        """The evaluation that selects: validation if there is a split, else test; the EMA's if it is the model."""
        if ema_is_model:
            return self.ema_val or self.ema_test
        return self.val or self.test

    def reported_test(self, ema_is_model: bool) -> Evaluation:
        """The run's test figures (the EMA's when it is the model)."""
        return self.ema_test if ema_is_model else self.test


def end_epoch(run: Run, epoch: int, started: tuple[float, int], why_stop: Callable) -> None:
    """After the last step of an epoch, or of the attempt (max_steps): evaluate, record, report, checkpoint.
    `started`: (time, step in epoch) when this epoch's steps began; `why_stop`: the loop's ending rule (a
    checkpoint is written in any case when the attempt ends here)."""
    train = epoch_train_figures(run, started)
    ev = evaluate_epoch(run)
    report_epoch(run, epoch, train, ev)
    epoch_done = run.state.step_in_epoch == run.batches.steps_per_epoch
    record_epoch(run, epoch, ev, epoch_done)
    run.save_if_due(epoch_end=epoch_done, final=why_stop(run) is not None)


def epoch_train_figures(run: Run, started: tuple[float, int]) -> dict:
    """The epoch's training loss and accuracy over every rank (a collective), its throughput, and the noise
    scale so far."""
    state, b = run.state, run.batches
    elapsed = time.time() - started[0]
    loss, correct, n = run.meter.total(run.accelerator)
    # Every step of the epoch skipped (NaN/inf: a large batch's short epoch can end before train.max_bad_steps):
    # no figures to average, NaN rather than a division by zero.
    loss, acc = (loss / n, correct / n) if n else (float("nan"), float("nan"))
    ips = (state.step_in_epoch - started[1]) * b.effective_batch / elapsed
    if state.step_in_epoch > started[1]:
        state.images_per_s.append(ips)
    noise = {} if run.noise is None else run.noise.terms()
    return {"loss": loss, "acc": acc, "lr": run.scheduler.get_last_lr()[0], "images_per_s": ips,
            "epoch_time_s": elapsed, **noise}


def evaluate_epoch(run: Run) -> EpochEvaluation:
    """Validation (with a split) and test, of the model and of its EMA; every rank with rank 0's BatchNorm
    statistics, as saved (DDP and ZeRO also train with them)."""
    broadcast_buffers(run.accelerator, run.model)
    faults.kill_point("eval", run.state.global_step, run.recipe.output_dir)
    ev = EpochEvaluation(test=_evaluate(run, run.test),
                         val=_evaluate(run, run.val, tta="none") if run.val is not None else None)
    if run.ema:
        with run.ema.swapped():
            ev.ema_test = _evaluate(run, run.test, tta="none")
            if run.val is not None:
                ev.ema_val = _evaluate(run, run.val, tta="none")
    return ev


def check_validation(run: Run, epoch: int) -> None:
    """eval.val_checks' evaluation inside an epoch, after this step: the validation split (the EMA's with
    train.ema_is_model, as an epoch end selects) with rank 0's BatchNorm statistics, as there; a `val_check` event
    with the noise scale's terms; and what it decides (the target's crossing, time and stop)."""
    state = run.state
    broadcast_buffers(run.accelerator, run.model)
    if run.ema and run.recipe.train.ema_is_model:
        with run.ema.swapped():
            ev = _evaluate(run, run.val, tta="none")
    else:
        ev = _evaluate(run, run.val, tta="none")
    noise = run.noise.terms() if run.noise else {}
    run.log.event("val_check", state.global_step, epoch + 1, loss=ev.loss, acc=ev.acc,
                  step_in_epoch=state.step_in_epoch, elapsed_s=round(time.time() - run.t_start, 3), **noise)
    note_selection(run, epoch, ev.acc, ev.loss)


def _evaluate(run: Run, data: EvalSet, tta: str | None = None) -> Evaluation:
    return evaluate_ranks(run.accelerator, run.model, data, run.recipe.train.eval_batch_size, run.in_dtype,
                          run.strategy.sharded_forward, run.recipe.speed.channels_last,
                          tta or run.recipe.eval.tta, len(run.classes))


def record_epoch(run: Run, epoch: int, ev: EpochEvaluation, epoch_done: bool) -> None:
    """What the evaluation decides: the best epoch so far, the time to tracking.time_to_acc, a stop at
    train.stop_at_acc; and the epoch marked done (a resumed run starts the next one)."""
    state, recipe = run.state, run.recipe
    ema_is_model = recipe.train.ema_is_model
    chosen, test = ev.selection(ema_is_model), ev.reported_test(ema_is_model)
    state.selection_acc = chosen.acc
    state.test_acc, state.test_loss, state.test_acc5 = test.acc, test.loss, test.acc5
    if ev.val is not None:
        val = ev.ema_val if ema_is_model else ev.val
        state.val_acc, state.val_loss, state.val_acc5 = val.acc, val.loss, val.acc5
    if chosen.acc > state.best_acc:
        state.best_acc, state.best_epoch, state.test_acc_at_best = chosen.acc, epoch + 1, test.acc
    note_selection(run, epoch, chosen.acc, chosen.loss)  # the target: its crossing, time and stop
    if epoch_done:
        state.epoch, state.step_in_epoch = epoch + 1, 0


def report_epoch(run: Run, epoch: int, train: dict, ev: EpochEvaluation) -> None:
    """The epoch's events (`train`, then `val` with a split, then `test`) and its one line."""
    state, log = run.state, run.log
    partial = {} if state.step_in_epoch == run.batches.steps_per_epoch else {"partial_epoch": True}
    log.event("train", state.global_step, epoch + 1, **train, **partial)
    elapsed = round(time.time() - run.t_start, 3)  # training wall time since the run began, over all attempts
    if ev.val is not None:
        ema = {} if ev.ema_val is None else {"ema_loss": ev.ema_val.loss, "ema_acc": ev.ema_val.acc}
        log.event("val", state.global_step, epoch + 1, loss=ev.val.loss, acc=ev.val.acc, **_top5(ev.val), **ema,
                  elapsed_s=elapsed, per_class_acc=ev.val.per_class_acc(), **partial)
    t = ev.test
    extra = {} if t.tta_acc is None else {"tta_loss": t.tta_loss, "tta_acc": t.tta_acc}
    if ev.ema_test is not None:
        extra.update(ema_loss=ev.ema_test.loss, ema_acc=ev.ema_test.acc)
    log.event("test", state.global_step, epoch + 1, loss=t.loss, acc=t.acc, **_top5(t), **extra, elapsed_s=elapsed,
              per_class_acc=t.per_class_acc(), confusion=t.confusion, **partial)
    log.confusion(state.global_step, run.classes, t.confusion)
    log.say(_epoch_line(epoch, state.global_step, train, ev, bool(partial)))


def _top5(e: Evaluation) -> dict:
    """`acc5` (metrics.jsonl; `test/acc5` and `val/acc5` in the trackers) where top-5 was measured."""
    return {} if e.acc5 is None else {"acc5": e.acc5}


def _top5_text(e: Evaluation) -> str:
    return "" if e.acc5 is None else f" top-5 {e.acc5:.4f}"


def _epoch_line(epoch: int, step: int, train: dict, ev: EpochEvaluation, partial: bool) -> str:
    t = ev.test
    line = (f"epoch {epoch + 1:3d} step {step:6d} | train loss {train['loss']:.4f} acc {train['acc']:.4f}"
            + (f" | val loss {ev.val.loss:.4f} acc {ev.val.acc:.4f}{_top5_text(ev.val)}" if ev.val is not None else "")
            + f" | test loss {t.loss:.4f} acc {t.acc:.4f}{_top5_text(t)}"
            + (f" (TTA {t.tta_acc:.4f})" if t.tta_acc is not None else "")
            + (f" | EMA {ev.ema_test.acc:.4f}" if ev.ema_test is not None else "")
            + f" | {train['images_per_s']:,.0f} img/s")
    if train.get("noise_scale"):
        line += f" | noise scale {train['noise_scale']:,.0f}"
    return line + (" (stopped mid-epoch)" if partial else "")
