"""The training loop, read top to bottom: `train` sets the run up and runs its epochs until `why_stop` names an
ending; each epoch runs its optimizer steps (`train_step`: forward and backward over `grad_accum`
micro-batches, then `update`; `record_step`, `log_step`), then evaluates and checkpoints (epoch_end.py); a stop
request checkpoints and leaves (`checkpoint_and_leave`); `finish` writes the final weights and the summary.
Nothing here depends on the distribution strategy: what differs is asked of `run.strategy`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alexdist import faults
from alexdist.checkpoint.weights import save_weights, weights_metadata
from alexdist.config import Recipe
from alexdist.data.batches import to_device
from alexdist.distributed.collectives import set_step_timeout
from alexdist.errors import STOPPED_EXIT_CODE
from alexdist.tracking.profiling import peak_memory_bytes
from alexdist.tracking.progress import Progress
from alexdist.tracking.summary import Ending, run_summary
from alexdist.training.build_run import build_run
from alexdist.training.divergence import diverged, nan_like
from alexdist.training.epoch_end import check_validation, end_epoch
from alexdist.training.evaluation import EpochMeter, batch_stats
from alexdist.training.noise_scale import cost_line
from alexdist.training.precision import loss_input
from alexdist.training.run import Run
from alexdist.training.val_checks import check_due


def why_stop(run: Run) -> Ending | None:
    """The one place that decides whether this attempt ends after the step just done, and why."""
    step = run.state.global_step
    if run.state.target_reached:
        return Ending.TARGET_REACHED
    if step >= run.total_steps:
        return Ending.FINISHED
    return Ending.MAX_STEPS if step >= run.last_step else None


def train(recipe: Recipe) -> dict:
    """Train (or continue) the run a recipe describes; returns its summary."""
    with build_run(recipe) as run:  # holds output_dir until the run ends, however it ends
        progress = Progress(run.accelerator.is_main_process, run.total_steps, run.batches.effective_batch,
                            run.state.global_step)
        ending = why_stop(run)  # a finished run resumed again ends at once
        if ending is not None and not run.state.evaluated:
            ending = evaluate_owed(run)
        while ending is None:
            ending = run_epoch(run, run.state.epoch, progress)
        return finish(run, ending)


def run_epoch(run: Run, epoch: int, progress: Progress) -> Ending | None:
    """The epoch's remaining optimizer steps, then its evaluation and checkpoint; how the attempt ends, if it
    ends here."""
    state = run.state
    run.model.train()
    # A run resumed mid-epoch carries the epoch's global sums so far.
    run.meter = EpochMeter(run.accelerator.device, state.epoch_sums if state.step_in_epoch else None,
                           run.accelerator.is_main_process)
    started = (time.time(), state.step_in_epoch)
    progress.start_epoch(epoch, run.batches.steps_per_epoch, state.step_in_epoch)
    if check_due(run):  # a stop request at an in-epoch evaluation's step left it to this attempt
        check_validation(run, epoch)
    for micro in run.batches.epoch(epoch, start_step=state.step_in_epoch) if not why_stop(run) else ():
        result = train_step(run, micro, state.global_step + 1)
        record_step(run, result, epoch)
        log_step(run, result, epoch, progress)
        if why_stop(run):  # the attempt's last step: its end (evaluation, final checkpoint, weights, summary)
            if result.stop_requested:  # takes priority over a stop request, so that no checkpoint is left
                run.log.say(f"alexdist: stop requested ({run.stop_requests.reason}) during the last step: "
                            f"finishing the run first")  # at its end without the evaluation it owes
            break
        if result.stop_requested:
            progress.end_epoch()
            checkpoint_and_leave(run, epoch)
            return Ending.STOP_REQUESTED
        if check_due(run):  # eval.val_checks: before the step's checkpoint, which then records it
            check_validation(run, epoch)
            if why_stop(run):  # train.stop_at_acc reached here: the epoch end's evaluation and checkpoint
                break
        run.save_if_due()
    progress.end_epoch()
    end_epoch(run, epoch, started, why_stop)
    return why_stop(run)


def evaluate_owed(run: Run) -> Ending | None:
    """The run's steps are done but its checkpoint holds no evaluation of them: it was written at a step that is
    now the attempt's last (a stop request there, or an every_steps checkpoint, then train.max_steps lowered to
    it). Evaluate, record and checkpoint those weights as the uninterrupted run did after that step."""
    state = run.state
    run.meter = EpochMeter(run.accelerator.device, state.epoch_sums if state.step_in_epoch else None,
                           run.accelerator.is_main_process)
    end_epoch(run, state.epoch, (time.time(), state.step_in_epoch), why_stop)
    return why_stop(run)


@dataclass
class StepResult:
    loss: torch.Tensor  # the last micro-batch's loss, on the device (reading it is a host sync)
    sums: torch.Tensor  # [summed loss, correct, count] over this rank's micro-batches, on the device
    bad: bool  # agreed by every rank: the loss or gradients were NaN/inf and the update was skipped
    stop_requested: bool  # agreed: some rank was asked to stop (signal or STOP file)


def train_step(run: Run, micro: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> StepResult:
    """Optimizer step `step` over this rank's `grad_accum` micro-batches: forward and backward each (gradients
    reduced on the last, where the strategy syncs), then `update`."""
    accelerator, model = run.accelerator, run.model
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    stop = bad = False
    run.profiler.before_step(step)
    if injected := faults.stop_point(step):  # tests: a stop request at an exact step, not a race with a file
        run.stop_requests.reason = run.stop_requests.reason or injected
    run.guard.remember_buffers(model)
    if run.probe:
        run.probe.start_step()
    for i, (xb, yb) in enumerate(micro):
        xb, yb = to_device(xb, accelerator.device, run.recipe.speed.channels_last), to_device(yb, accelerator.device)
        if faults.poisoned(step):
            xb = nan_like(xb)
        with accelerator.accumulate(model):
            run.strategy.set_gradient_sync(model, accelerator.sync_gradients)
            out = model(xb.to(run.in_dtype))
            loss = F.cross_entropy(loss_input(out), yb, label_smoothing=run.recipe.train.label_smoothing)
            _backward(run, loss)  # where the strategy's engine steps itself (DeepSpeed), also the step
            if run.probe:
                run.probe.after_backward(i, run.params)
            if accelerator.sync_gradients:
                stop, bad = update(run, loss)
        sums += batch_stats(loss.detach() * len(yb), loss_input(out.detach()), yb)
    return StepResult(loss, sums, bad, stop)


def update(run: Run, loss: torch.Tensor) -> tuple[bool, bool]:
    """The update after a step's last backward: clip, agree with every rank on stop requests and on a bad
    (NaN/inf) step in the step's one all-reduce and host sync, then step the optimizer and the schedule unless
    the step is bad. Returns (stop requested, bad), as agreed.

    The optimizer is stepped here rather than by Accelerate's prepared optimizer, which skips non-final
    micro-batches itself, because FSDP's is not prepared: the same rule written once for both."""
    t, strategy, guard, opt = run.recipe.train, run.strategy, run.guard, run.optimizer
    clip = t.grad_clip and not strategy.clips_itself
    norm = run.accelerator.clip_grad_norm_(run.model.parameters(), t.grad_clip) if clip else None
    flag, norm = guard.bad_flag(run.model, loss, norm)
    measures = _noise_measures(run, norm)
    stop, bad, summed = run.stop_requests.agree(flag, measures)
    if measures is not None and not bad:
        world = run.accelerator.num_processes
        run.noise.update(summed[0] / world, summed[1] / world)
    if not (bad and guard.own_skip):  # an fp16 GradScaler must see a bad step to lower its scale
        opt.step()
        if not bad:
            run.scheduler.step()  # a no-op where the strategy's engine steps it
    opt.zero_grad(set_to_none=True)
    return stop, bad


def _noise_measures(run: Run, norm: torch.Tensor | None) -> torch.Tensor | None:
    """[|G_small|^2, |G_big|^2] of this step on the device (no sync), for the noise scale; None if not measured.
    Under fp16 the probe saw scaled gradients: divided by the scale squared."""
    if run.probe is None or norm is None:
        return None
    small = run.probe.small_sq
    if (scale := run.guard.loss_scale_tensor()) is not None:
        small = small / scale.float().square()
    return torch.stack([small.float(), norm.detach().float().square()])


def _backward(run: Run, loss: torch.Tensor) -> None:
    try:
        run.accelerator.backward(loss)
    except Exception as exc:
        if why := run.strategy.backward_failure(exc):  # an engine giving up (on every rank)
            raise diverged(why, run.checkpointer.latest()) from None
        raise


def record_step(run: Run, result: StepResult, epoch: int) -> None:
    """Count a finished optimizer step: fault points, the divergence guard, the epoch's sums, the EMA."""
    state, out = run.state, run.recipe.output_dir
    state.global_step += 1
    state.step_in_epoch += 1
    run.profiler.after_step(state.global_step)
    state.forget_evaluation()  # measured at an earlier step
    if state.global_step == run.info["resumed_at_step"] + 1:  # this attempt's first step: setup is over
        set_step_timeout(run.recipe.distributed.step_timeout_s)
    faults.kill_point("train", state.global_step, out)
    faults.hang_point(state.global_step, out)
    if result.bad:
        run.guard.restore_buffers()
        run.log.event("bad_step", state.global_step, epoch + 1, loss=result.loss.item(),
                      loss_scale=run.guard.loss_scale())
        if why := run.guard.update(state.global_step, True):
            run.log.event("diverged", state.global_step, epoch + 1, reason=why)
            raise diverged(why, run.checkpointer.latest())
    else:
        run.guard.update(state.global_step, False)
        run.meter.add(result.sums)  # a skipped step's NaN loss stays out of the epoch's statistics
        if run.ema:
            run.ema.update()


def log_step(run: Run, result: StepResult, epoch: int, progress: Progress) -> None:
    """The step's log line (metrics.jsonl, W&B) every train.log_every steps, and the progress display. Reading
    the loss is a host sync: only on the steps that log it."""
    step, lr = run.state.global_step, run.scheduler.get_last_lr()[0]
    log_every = run.recipe.train.log_every
    loss = result.loss.item() if log_every and step % log_every == 0 else None
    if loss is not None:
        run.log.event("step", step, epoch + 1, loss=loss, lr=lr)
    progress.step(step, loss, lr)


def checkpoint_and_leave(run: Run, epoch: int) -> None:
    """A stop request: checkpoint this step and leave, without evaluating, so the wait is one step plus one
    save. The epoch is not marked done even after its last step, so the resumed run still evaluates it."""
    path = run.save_if_due(final=True)
    reason = run.stop_requests.reason
    run.log.event("stop", run.state.global_step, epoch + 1, reason=reason, checkpoint=str(path))
    run.log.say(f"alexdist: stop requested ({reason}): checkpoint {path}, exiting {STOPPED_EXIT_CODE}")


def final_state_dict(run: Run) -> dict[str, torch.Tensor]:
    """The weights to export, on every rank (a collective where ranks hold shards or partitions): the EMA with
    train.ema_is_model, else the strategy's full state dict (rank 0's; the fp32 masters under DeepSpeed
    fp16/bf16)."""
    if run.ema and run.recipe.train.ema_is_model:
        return run.ema.weights()
    return run.strategy.final_weights(run.accelerator, run.model, run.recipe.precision)


def finish(run: Run, ending: Ending) -> dict:
    """Final weights (skipped when stopped on request: they are in the checkpoint just written), summary.json,
    trackers closed."""
    accelerator, state, recipe = run.accelerator, run.state, run.recipe
    state.train_time_s = time.time() - run.t_start
    device = accelerator.device
    peaks = [int(v) for v in accelerator.gather(torch.tensor([peak_memory_bytes(device)], dtype=torch.int64,
                                                             device=device)).tolist()]
    if ending is not Ending.STOP_REQUESTED:
        weights = final_state_dict(run)
        if accelerator.is_main_process:
            meta = weights_metadata(recipe, state.global_step, state.test_acc, run.classes, state.normalization)
            save_weights(f"{recipe.output_dir}/model.safetensors", weights, meta)
    summary = run_summary(recipe, state, run.info, ending, peaks, accelerator.process_index, device.type,
                          run.noise.facts() if run.noise else None, rank_checksums(run))
    run.log.finish(summary)
    if ending is not Ending.STOP_REQUESTED:
        on = state.selected_on
        top5 = "" if state.test_acc5 is None else f" top-5 {state.test_acc5:.4f}"
        run.log.say(f"alexdist: done at step {state.global_step} | final test acc {state.test_acc:.4f}{top5} | best "
                    f"{on} acc {state.best_acc:.4f} at epoch {state.best_epoch}"
                    + (f" (test acc there {state.test_acc_at_best:.4f})" if on == "val" else ""))
        if line := cost_line(run.batches.effective_batch, run.noise.value if run.noise else None):
            run.log.say(f"alexdist: note: {line}")
    return summary


def rank_checksums(run: Run) -> dict[str, list[float] | None]:
    """Every rank's sum of its parameters and of its buffers: equal values prove the ranks stayed in sync (where
    ranks hold shards or partitions, not whole parameters, there is nothing to compare)."""
    if not run.strategy.whole_weights:
        return {"rank_param_sums": None, "rank_buffer_sums": None}
    from alexdist.distributed.collectives import plain_module

    accelerator = run.accelerator
    module = plain_module(accelerator, run.model)
    zero = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    mine = torch.stack([sum((p.detach().double().sum() for p in module.parameters()), zero),
                        sum((b.detach().double().sum() for b in module.buffers()), zero)])
    sums = accelerator.gather(mine.reshape(1, 2)).tolist()
    return {"rank_param_sums": [s[0] for s in sums], "rank_buffer_sums": [s[1] for s in sums]}
