"""The training loop, read top to bottom: `train` sets the run up and runs its epochs; each epoch runs its
optimizer steps (`train_step`, each over `grad_accum` micro-batches, then `record_step` and `log_step`),
evaluates and checkpoints (`end_epoch`); a stop request checkpoints and leaves (`checkpoint_and_leave`); `finish`
writes the final weights and the summary. Nothing here depends on the distribution strategy: what differs is
asked of `run.strategy`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alexdist import faults
from alexdist.artifacts.weights import save_weights, weights_metadata
from alexdist.config import Recipe
from alexdist.data.batches import to_device
from alexdist.distributed.collectives import broadcast_buffers, plain_module, set_step_timeout
from alexdist.tracking.profiling import peak_memory_bytes
from alexdist.tracking.progress import Progress
from alexdist.tracking.runlog import git_commit
from alexdist.training.divergence import diverged, nan_like
from alexdist.training.evaluation import EpochMeter, Evaluation, batch_stats, evaluate_ranks
from alexdist.training.precision import loss_input
from alexdist.training.run import Run
from alexdist.training.setup import setup
from alexdist.training.stop_requests import STOPPED_EXIT_CODE


class Ending(enum.Enum):
    """Why a run attempt ends; the value is summary.json's `status`."""

    FINISHED = "finished"  # the schedule's last step (train.epochs) is done
    MAX_STEPS = "max_steps"  # train.max_steps reached; the same command with a larger cap continues it
    STOP_REQUESTED = "stopped"  # a signal or output_dir/STOP: checkpointed, exit 75, resumable
    TARGET_REACHED = "target_reached"  # an evaluation reached train.stop_at_acc


def reached_end(run: Run) -> Ending | None:
    """FINISHED, TARGET_REACHED or MAX_STEPS once this attempt's last step is done, else None."""
    step = run.state.global_step
    if run.state.target_reached:
        return Ending.TARGET_REACHED
    if step >= run.total_steps:
        return Ending.FINISHED
    return Ending.MAX_STEPS if step >= run.last_step else None


def train(recipe: Recipe) -> dict:
    """Train (or continue) the run a recipe describes; returns its summary."""
    with setup(recipe) as run:  # holds output_dir until the run ends, however it ends
        return _loop(run)


def _loop(run: Run) -> dict:
    """Epochs of optimizer steps, each epoch evaluated and checkpointed; then the final weights and summary."""
    recipe, state = run.recipe, run.state
    main = run.accelerator.is_main_process
    progress = Progress(main, run.total_steps, run.batches.effective_batch, state.global_step)
    ending = reached_end(run)  # a finished run resumed again ends at once
    for epoch in range(state.epoch, recipe.train.epochs):
        if ending:
            break
        run.model.train()
        # A run resumed mid-epoch carries the epoch's global sums so far.
        run.meter = EpochMeter(run.accelerator.device, state.epoch_sums if state.step_in_epoch else None, main)
        started = (time.time(), state.step_in_epoch)
        progress.start_epoch(epoch, run.batches.steps_per_epoch, state.step_in_epoch)
        for micro in run.batches.epoch(epoch, start_step=state.step_in_epoch):
            result = train_step(run, micro, state.global_step + 1)
            record_step(run, result, epoch)
            log_step(run, result, epoch, progress)
            if ending := reached_end(run) or (Ending.STOP_REQUESTED if result.stop_requested else None):
                break
            run.save_if_due()
        progress.end_epoch()
        if ending is Ending.STOP_REQUESTED:
            checkpoint_and_leave(run, epoch)
            break
        if end_epoch(run, epoch, started, last=ending is not None):
            ending = Ending.TARGET_REACHED
            break
    return finish(run, ending or reached_end(run) or Ending.FINISHED)


@dataclass
class StepResult:
    loss: torch.Tensor  # the last micro-batch's loss, on the device (reading it is a host sync)
    sums: torch.Tensor  # [summed loss, correct, count] over this rank's micro-batches, on the device
    bad: bool  # agreed by every rank: the loss or gradients were NaN/inf and the update was skipped
    stop_requested: bool  # agreed: some rank was asked to stop (signal or STOP file)


def train_step(run: Run, micro: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> StepResult:
    """Optimizer step `step` over this rank's `grad_accum` micro-batches. Its one host sync is the agreement of
    stop requests and NaN/inf flags, after backward and before the optimizer touches the weights."""
    accelerator, model, opt, guard, t = run.accelerator, run.model, run.optimizer, run.guard, run.recipe.train
    strategy = run.strategy
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    stop = bad = False
    run.profiler.before_step(step)
    guard.remember_buffers(model)
    for xb, yb in micro:
        xb, yb = to_device(xb, accelerator.device, run.recipe.speed.channels_last), to_device(yb, accelerator.device)
        if faults.poisoned(step):
            xb = nan_like(xb)
        with accelerator.accumulate(model):
            strategy.set_gradient_sync(model, accelerator.sync_gradients)
            strategy.before_forward(accelerator, model)
            out = model(xb.to(run.in_dtype))
            loss = F.cross_entropy(loss_input(out), yb, label_smoothing=t.label_smoothing)
            _backward(run, loss)  # where the strategy's engine steps itself (DeepSpeed), also the step
            if accelerator.sync_gradients:
                clip = t.grad_clip and not strategy.clips_itself
                norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip) if clip else None
                stop, bad = run.stop_requests.agree(guard.bad_flag(model, loss, norm))
                # (Accelerate's prepared optimizer would skip non-final micro-batches itself; FSDP's is not
                # prepared: the same rule, written once for both.)
                if not (bad and guard.own_skip):  # an fp16 GradScaler must see a bad step to lower its scale
                    opt.step()
                    if not bad:
                        run.scheduler.step()  # a no-op where the strategy's engine steps it
                opt.zero_grad(set_to_none=True)
        sums += batch_stats(loss.detach() * len(yb), loss_input(out.detach()), yb)
    return StepResult(loss, sums, bad, stop)


def _backward(run: Run, loss: torch.Tensor) -> None:
    try:
        run.accelerator.backward(loss)
    except Exception as exc:
        if why := run.strategy.backward_failure(exc):  # an engine giving up (on every rank)
            raise diverged(why, run.checkpointer.latest()) from None
        raise


def record_step(run: Run, result: StepResult, epoch: int) -> None:
    """Count a finished optimizer step: fault points, the divergence guard, the epoch's sums, the step's log."""
    state, out = run.state, run.recipe.output_dir
    state.global_step += 1
    state.step_in_epoch += 1
    run.profiler.after_step(state.global_step)
    state.test_acc = state.test_loss = None  # measured at an earlier step
    if state.global_step == run.info["resumed_at_step"] + 1:  # this attempt's first step: setup is over
        set_step_timeout(run.recipe.distributed.timeout_s)
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


def log_step(run: Run, result: StepResult, epoch: int, progress) -> None:
    """The step's log line (metrics.jsonl, W&B) every train.log_every steps, and the progress display. Reading
    the loss is a host sync: only on the steps that log it."""
    step, lr = run.state.global_step, run.scheduler.get_last_lr()[0]
    log_every = run.recipe.train.log_every
    loss = result.loss.item() if log_every and step % log_every == 0 else None
    if loss is not None:
        run.log.event("step", step, epoch + 1, loss=loss, lr=lr)
    progress.step(step, loss, lr)


def end_epoch(run: Run, epoch: int, started: tuple[float, int], last: bool) -> bool:
    """After the last step of an epoch (or of the run): the epoch's training figures, a test evaluation, the
    best accuracy so far, and the epoch-end checkpoint. `started`: (time, step in epoch) when this epoch began;
    `last`: this attempt ends here (a checkpoint is then written in any case). True when the evaluation reached
    train.stop_at_acc (the run ends, checkpointed)."""
    state, log, b = run.state, run.log, run.batches
    epoch_done = state.step_in_epoch == b.steps_per_epoch
    epoch_time = time.time() - started[0]
    tr_loss, tr_correct, tr_n = run.meter.total(run.accelerator)
    # Every step of the epoch skipped (NaN/inf: a large batch's short epoch can end before train.max_bad_steps):
    # no figures to average, NaN rather than a division by zero.
    tr_loss, tr_correct = (tr_loss / tr_n, tr_correct / tr_n) if tr_n else (float("nan"), float("nan"))
    ips = (state.step_in_epoch - started[1]) * b.effective_batch / epoch_time
    if state.step_in_epoch > started[1]:
        state.images_per_s.append(ips)
    partial = {} if epoch_done else {"partial_epoch": True}
    log.event("train", state.global_step, epoch + 1, loss=tr_loss, acc=tr_correct,
              lr=run.scheduler.get_last_lr()[0], images_per_s=ips, epoch_time_s=epoch_time, **partial)
    ev = evaluate(run)
    extra = {} if ev.tta_acc is None else {"tta_loss": ev.tta_loss, "tta_acc": ev.tta_acc}
    test_loss, test_acc = ev.loss, ev.acc
    if run.ema:
        with run.ema.swapped():
            ema = evaluate(run, tta="none")
        extra.update(ema_loss=ema.loss, ema_acc=ema.acc)
        if run.recipe.train.ema_eval:  # the EMA is the run's model: its accuracy picks the best checkpoint
            test_loss, test_acc = ema.loss, ema.acc
    # elapsed_s: training wall time since the run began, summed over resumed attempts.
    log.event("test", state.global_step, epoch + 1, loss=ev.loss, acc=ev.acc, **extra,
              elapsed_s=round(time.time() - run.t_start, 3), per_class_acc=ev.per_class_acc(),
              confusion=ev.confusion, **partial)
    log.confusion(state.global_step, run.classes, ev.confusion)
    target = run.recipe.tracking.target_acc
    if target and test_acc >= target and state.time_to_target_s is None:
        state.time_to_target_s, state.epoch_to_target = time.time() - run.t_start, epoch + 1
    log.say(
        f"epoch {epoch + 1:3d} step {state.global_step:6d} | train loss {tr_loss:.4f} acc "
        f"{tr_correct:.4f} | test loss {ev.loss:.4f} acc {ev.acc:.4f}"
        + (f" (TTA {ev.tta_acc:.4f})" if ev.tta_acc is not None else "")
        + (f" | EMA {extra['ema_acc']:.4f}" if run.ema else "") + f" | {ips:,.0f} img/s"
        + ("" if epoch_done else " (stopped mid-epoch)")
    )
    state.test_acc, state.test_loss = test_acc, test_loss
    if test_acc > state.best_acc:
        state.best_acc, state.best_epoch = test_acc, epoch + 1
    if epoch_done:
        state.epoch, state.step_in_epoch = epoch + 1, 0
    stop_at = run.recipe.train.stop_at_acc
    if stop_at and test_acc >= stop_at:
        state.target_reached = True
        log.say(f"alexdist: test accuracy {test_acc:.4f} reached train.stop_at_acc={stop_at}: stopping here")
    run.save_if_due(epoch_end=epoch_done, final=last or state.target_reached)
    return state.target_reached


def evaluate(run: Run, tta: str | None = None) -> Evaluation:
    """The model as it will be saved, on the test set (every rank with the same BatchNorm statistics);
    `tta` overrides eval.tta."""
    broadcast_buffers(run.accelerator, run.model)  # rank 0's, as saved (DDP and ZeRO also train with them)
    faults.kill_point("eval", run.state.global_step, run.recipe.output_dir)
    return evaluate_ranks(run.accelerator, run.model, run.test_x, run.test_y, run.recipe.train.eval_batch_size,
                          run.input_size, run.in_dtype, run.strategy.sharded_forward,
                          run.recipe.speed.channels_last, tta or run.recipe.eval.tta, len(run.classes))


def checkpoint_and_leave(run: Run, epoch: int) -> None:
    """A stop request: checkpoint this step and leave, without evaluating, so the wait is one step plus one
    save. The epoch is not marked done even after its last step, so the resumed run still evaluates it."""
    path = run.save_if_due(final=True)
    reason = run.stop_requests.reason
    run.log.event("stop", run.state.global_step, epoch + 1, reason=reason, checkpoint=str(path))
    run.log.say(f"alexdist: stop requested ({reason}): checkpoint {path}, exiting {STOPPED_EXIT_CODE}")


def final_state_dict(run: Run) -> dict[str, torch.Tensor]:
    """The weights to export, on every rank (a collective where ranks hold shards or partitions): the EMA with
    train.ema_eval, else the strategy's full state dict (rank 0's; the fp32 masters under DeepSpeed fp16/bf16)."""
    if run.ema and run.recipe.train.ema_eval:
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
            meta = weights_metadata(recipe, state.global_step, state.test_acc, run.classes)
            save_weights(f"{recipe.output_dir}/model.safetensors", weights, meta)
    summary = {
        "status": ending.value, "recipe": recipe.name, "model": recipe.model.name, "precision": recipe.precision,
        **run.info,
        "epochs_run": state.epoch + (1 if state.step_in_epoch else 0), "steps": state.global_step,
        "final_test_acc": state.test_acc, "final_test_loss": state.test_loss,
        "best_test_acc": state.best_acc, "best_epoch": state.best_epoch,
        "target_acc": recipe.tracking.target_acc, "time_to_target_s": state.time_to_target_s,
        "epoch_to_target": state.epoch_to_target,
        "images_per_s": sum(state.images_per_s) / max(1, len(state.images_per_s)),
        "train_time_s": round(state.train_time_s, 2), "git_commit": git_commit(), **rank_checksums(run),
        # Every rank's peak: CUDA's peak allocation on GPUs, the peak resident set size on CPUs; and this rank's
        # on a GPU (the GPU check reads it).
        "peak_memory_bytes_per_rank": peaks,
        "peak_memory_bytes": peaks[accelerator.process_index] if device.type == "cuda" else None,
        "wandb_run_id": state.wandb_run_id,
    }
    run.log.finish(summary)
    if ending is not Ending.STOP_REQUESTED:
        run.log.say(f"alexdist: done at step {state.global_step} | final test acc {summary['final_test_acc']:.4f} "
                    f"(best {state.best_acc:.4f} at epoch {state.best_epoch})")
    return summary


def rank_checksums(run: Run) -> dict[str, list[float] | None]:
    """Every rank's sum of its parameters and of its buffers: equal values prove the ranks stayed in sync (where
    ranks hold shards or partitions, not whole parameters, there is nothing to compare)."""
    if not run.strategy.whole_weights:
        return {"rank_param_sums": None, "rank_buffer_sums": None}
    accelerator = run.accelerator
    module = plain_module(accelerator, run.model)
    zero = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    mine = torch.stack([sum((p.detach().double().sum() for p in module.parameters()), zero),
                        sum((b.detach().double().sum() for b in module.buffers()), zero)])
    sums = accelerator.gather(mine.reshape(1, 2)).tolist()
    return {"rank_param_sums": [s[0] for s in sums], "rank_buffer_sums": [s[1] for s in sums]}
