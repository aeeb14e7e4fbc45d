"""Train a model of the AlexNet family from a recipe.

    accelerate launch -m alexdist.train recipes/bn.yaml [key=value ...]
    accelerate launch --multi_gpu --num_processes 2 -m alexdist.train recipes/quickstart.yaml   # 2 CPU ranks
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m alexdist.train recipes/bn.yaml
    python -m alexdist.train recipes/quickstart.yaml train.epochs=1

Read top to bottom: recipe -> accelerator -> data on the device -> model/optimizer/schedule -> resume if a
checkpoint exists -> loop over optimizer steps (each `grad_accum` micro-batches) -> evaluate and checkpoint
each epoch -> final weights and summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alexdist import faults, speed
from alexdist.batches import TrainBatches
from alexdist.checkpoint import Checkpointer, TrainState, check_space, check_writable, checkpoint_bytes
from alexdist.config import Recipe, load_recipe
from alexdist.data import load_dataset
from alexdist.distributed import (
    exit_now,
    is_launch_rank_zero,
    launched_world_size,
    lost_peer,
    make_accelerator,
    plain_module,
    resolve_strategy,
)
from alexdist.errors import AlexdistError, ConfigError, DivergedError
from alexdist.evaluate import average_buffers, batch_stats, evaluate_ranks
from alexdist.guard import DivergenceGuard, nan_like
from alexdist.models import build_model, count_params, resolve_input_size
from alexdist.optim import lr_factor, make_optimizer
from alexdist.speed import to_device
from alexdist.stopping import STOPPED_EXIT_CODE, StopRequest
from alexdist.tracking import RunLog, git_commit, wandb_mode


def resolve_batch_size(recipe: Recipe, world: int) -> None:
    """Apply `train.global_batch`: the per-process batch that keeps the effective batch on `world` processes."""
    t = recipe.train
    if t.global_batch is None:
        return
    per = t.global_batch // (world * t.grad_accum)
    if per * world * t.grad_accum != t.global_batch:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by {world} processes x train.grad_accum="
            f"{t.grad_accum}; choose a global batch that is, or change train.grad_accum"
        )
    t.batch_size = per


def train(recipe: Recipe) -> dict:
    check_writable(recipe.output_dir)  # before any work: an unwritable output_dir would lose it all
    world_launched = launched_world_size()
    resolve_batch_size(recipe, world_launched)
    strategy, zero_stage = resolve_strategy(recipe)
    accelerator = make_accelerator(recipe, strategy, zero_stage, log_with=["wandb"] if wandb_mode(recipe) else None)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    t_cfg = recipe.train
    input_size = resolve_input_size(recipe.model.name, recipe.model.input_size)
    deepspeed = strategy == "deepspeed"
    # DeepSpeed keeps the module itself in bf16/fp16 without autocast: inputs are cast by hand.
    in_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.precision, torch.float32) if deepspeed else torch.float32

    stop = StopRequest(accelerator, recipe.output_dir)  # SIGTERM / SIGUSR1 / output_dir/STOP

    # Rank 0 decodes the source and writes the cache; the others then read the cache.
    with accelerator.main_process_first():
        ds = load_dataset(recipe.data)
    data_device = device if recipe.speed.data_on_device else torch.device("cpu")
    train_x, train_y = ds.train_x.to(data_device), ds.train_y.to(data_device)
    test_x, test_y = ds.test_x.to(device), ds.test_y.to(device)
    batches = TrainBatches(
        train_x, train_y, t_cfg.batch_size, t_cfg.grad_accum, rank, world, t_cfg.seed, recipe.augment, input_size
    )
    if batches.steps_per_epoch == 0:
        raise ConfigError(
            f"the effective batch ({batches.effective_batch} = train.batch_size {t_cfg.batch_size} x {world} "
            f"processes x train.grad_accum {t_cfg.grad_accum}) is larger than the {len(train_y)} training images; "
            f"lower train.batch_size or train.grad_accum"
        )
    # The schedule is sized by epochs; max_steps only stops early, so a capped run resumes into the full one.
    total_steps = t_cfg.epochs * batches.steps_per_epoch
    stop_step = min(total_steps, t_cfg.max_steps or total_steps)

    torch.manual_seed(t_cfg.seed)  # the same initial weights on every rank and every world size
    model = build_model(recipe.model.name, input_size, recipe.model.dropout, recipe.model.width_mult)
    model = speed.apply_to_model(model.to(device), recipe, deepspeed)  # channels_last, BatchNorm in fp32
    n_params = count_params(model)
    check_space(recipe.output_dir, 2 * checkpoint_bytes(n_params, recipe))
    lr = recipe.optim.lr * (batches.effective_batch / recipe.optim.ref_batch if recipe.optim.ref_batch else 1.0)
    optimizer = make_optimizer(model, recipe, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, recipe.schedule))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # Dropout masks come from the global RNG: distinct per rank (as with separate GPUs), reproducible per seed.
    torch.manual_seed(t_cfg.seed * 1000 + rank + 1)

    ckpt = Checkpointer(accelerator, recipe, model)
    guard = DivergenceGuard(accelerator, optimizer, recipe, deepspeed)
    state = TrainState(effective_batch=batches.effective_batch, world_size=world, strategy=strategy,
                       zero_stage=zero_stage)
    resume_from = ckpt.resume_path()
    if resume_from is not None:
        state = ckpt.load(resume_from, strategy, world)
        if state.effective_batch != batches.effective_batch:
            raise ConfigError(
                f"{resume_from} was trained with an effective batch of {state.effective_batch}, this run has "
                f"{batches.effective_batch} ({world} processes); set train.global_batch={state.effective_batch} "
                f"to keep the data position and schedule"
            )
        state.world_size = world

    info = {
        "world_size": world, "strategy": strategy, "zero_stage": zero_stage,
        "effective_batch": batches.effective_batch, "batch_size_per_process": t_cfg.batch_size,
        "steps_per_epoch": batches.steps_per_epoch, "total_steps": total_steps, "stop_step": stop_step,
        "peak_lr": lr, "params": n_params, "input_size": input_size, "device": str(device),
        "distributed_type": str(accelerator.distributed_type),
        "resumed_from": str(resume_from) if resume_from else None, "resumed_at_step": state.global_step,
    }
    log = RunLog(accelerator, recipe)
    state.wandb_run_id = log.start(info, resume_step=state.global_step if resume_from else None,
                                   run_id=state.wandb_run_id)
    accelerator.print(
        f"alexdist: {recipe.model.name} @ {input_size}px ({n_params / 1e6:.2f} M params) on {world} x {device}, "
        f"{strategy}{f' ZeRO-{zero_stage}' if deepspeed else ''} | effective batch {batches.effective_batch} = "
        f"{t_cfg.batch_size} per process x {world} processes x {t_cfg.grad_accum} accumulation | "
        f"{batches.steps_per_epoch} steps/epoch, {total_steps} steps, peak lr {lr:.4g} | precision "
        f"{recipe.precision} | output {recipe.output_dir}"
        + (f" | resumed from {resume_from} at step {state.global_step}" if resume_from else "")
    )

    t_start = time.time() - state.train_time_s
    stopping = state.global_step >= stop_step  # reached train.max_steps / the end
    stop_requested = False  # asked to stop (signal or STOP file): checkpoint and exit, resumable
    for epoch in range(state.epoch, t_cfg.epochs):
        if stopping or stop_requested:
            break
        model.train()
        # This epoch's running sums; a mid-epoch resume carries the global sums so far (added once, on rank 0).
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        if state.step_in_epoch and accelerator.is_main_process:
            sums += torch.tensor(state.epoch_sums, dtype=torch.float64, device=device)
        t_epoch, seen_at_start = time.time(), state.step_in_epoch
        bar = tqdm(total=batches.steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {epoch + 1}",
                   disable=not (accelerator.is_main_process and sys.stderr.isatty()), leave=False, dynamic_ncols=True)
        for micro in batches.epoch(epoch, start_step=state.step_in_epoch):
            step_sums = torch.zeros_like(sums)
            skip = stop_now = bad = False
            guard.remember_buffers(model)
            for xb, yb in micro:
                xb, yb = to_device(xb, device, recipe.speed.channels_last), to_device(yb, device)
                if faults.poisoned(state.global_step + 1):
                    xb = nan_like(xb)
                with accelerator.accumulate(model):
                    out = model(xb.to(in_dtype))
                    loss = F.cross_entropy(out.float(), yb, label_smoothing=t_cfg.label_smoothing)
                    accelerator.backward(loss)  # under DeepSpeed, at the last micro-batch, also the engine's step
                    if accelerator.sync_gradients:
                        clip = t_cfg.grad_clip and not deepspeed  # DeepSpeed clips itself
                        norm = accelerator.clip_grad_norm_(model.parameters(), t_cfg.grad_clip) if clip else None
                        # The step's one host sync: stop requests and NaN/inf, agreed by every rank.
                        stop_now, bad = stop.requested(guard.bad_flag(model, loss, norm))
                        skip = bad and guard.own_skip
                    if not skip:
                        optimizer.step()
                        if accelerator.sync_gradients and not optimizer.step_was_skipped:
                            scheduler.step()  # a no-op under DeepSpeed, whose engine steps it
                    optimizer.zero_grad(set_to_none=True)
                step_sums += batch_stats(loss.detach() * len(yb), out.detach().float(), yb)  # on the device: no host sync
            bad = bad or guard.scaler_skipped()  # fp16 under Accelerate: the GradScaler skipped (same on all ranks)
            state.global_step += 1
            state.step_in_epoch += 1
            faults.kill_point("train", state.global_step, recipe.output_dir)
            faults.hang_point(state.global_step, recipe.output_dir)
            if bad:
                guard.restore_buffers(model)
                log.event("bad_step", state.global_step, epoch + 1, loss=loss.item(), loss_scale=guard.loss_scale())
                if why := guard.update(state.global_step, True):
                    kept = ckpt.latest()
                    log.event("diverged", state.global_step, epoch + 1, reason=why)
                    raise DivergedError(
                        f"training diverged: {why}; the newest checkpoint ({kept or 'none yet'}) holds good "
                        f"weights (skipped steps change nothing, non-finite weights are never saved): resume "
                        f"from it with a lower optim.lr or with train.grad_clip set"
                    )
            else:
                guard.update(state.global_step, False)
                sums += step_sums  # a skipped step's NaN loss stays out of the epoch's statistics
            bar.update(1)
            if t_cfg.log_every and state.global_step % t_cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                log.event("step", state.global_step, epoch + 1, loss=loss.item(), lr=scheduler.get_last_lr()[0])
            stopping = state.global_step >= stop_step
            if stopping:
                break
            if stop_now:
                stop_requested = True
                break
            epoch_end_save = state.step_in_epoch == batches.steps_per_epoch and recipe.checkpoint.epoch_end
            if ckpt.due_at_step(state.global_step) and not epoch_end_save:  # that one comes after evaluating
                state.epoch_sums = accelerator.reduce(sums.clone(), reduction="sum").tolist()
                state.test_acc = state.test_loss = None
                state.train_time_s = time.time() - t_start
                ckpt.save(state)
        bar.close()
        if stop_requested:
            # Checkpoint this step and leave: no evaluation, so the wait is one step plus one save. The epoch
            # is not marked done even after its last step, so the resumed run still evaluates it.
            state.epoch_sums = accelerator.reduce(sums.clone(), reduction="sum").tolist()
            state.samples_in_epoch = state.step_in_epoch * batches.effective_batch
            state.test_acc = state.test_loss = None
            state.train_time_s = time.time() - t_start
            path = ckpt.save(state)
            log.event("stop", state.global_step, epoch + 1, reason=stop.reason, checkpoint=str(path))
            accelerator.print(f"alexdist: stop requested ({stop.reason}): checkpoint {path}, exiting {STOPPED_EXIT_CODE}")
            break

        epoch_done = state.step_in_epoch == batches.steps_per_epoch
        epoch_time = time.time() - t_epoch
        tr_loss, tr_correct, tr_n = accelerator.reduce(sums, reduction="sum").tolist()
        ips = (state.step_in_epoch - seen_at_start) * batches.effective_batch / epoch_time
        if state.step_in_epoch > seen_at_start:
            state.images_per_s.append(ips)
        partial = {} if epoch_done else {"partial_epoch": True}
        log.event("train", state.global_step, epoch + 1, loss=tr_loss / tr_n, acc=tr_correct / tr_n,
                  lr=scheduler.get_last_lr()[0], images_per_s=ips, epoch_time_s=epoch_time, **partial)
        if deepspeed:
            average_buffers(accelerator, model)
        faults.kill_point("eval", state.global_step, recipe.output_dir)
        test_loss, test_acc = evaluate_ranks(accelerator, model, test_x, test_y, t_cfg.eval_batch_size, input_size,
                                       in_dtype, deepspeed and zero_stage == 3)
        # elapsed_s: training wall time since the run began, summed over resumed attempts.
        log.event("test", state.global_step, epoch + 1, loss=test_loss, acc=test_acc,
                  elapsed_s=round(time.time() - t_start, 3), **partial)
        target = recipe.tracking.target_acc
        if target and test_acc >= target and state.time_to_target_s is None:
            state.time_to_target_s, state.epoch_to_target = time.time() - t_start, epoch + 1
        accelerator.print(
            f"epoch {epoch + 1:3d} step {state.global_step:6d} | train loss {tr_loss / tr_n:.4f} acc "
            f"{tr_correct / tr_n:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f} | {ips:,.0f} img/s"
            + ("" if epoch_done else " (stopped mid-epoch)")
        )
        state.test_acc, state.test_loss = test_acc, test_loss
        if test_acc > state.best_acc:
            state.best_acc, state.best_epoch = test_acc, epoch + 1
        if epoch_done:
            state.epoch, state.step_in_epoch, state.epoch_sums = epoch + 1, 0, [0.0, 0.0, 0.0]
        else:
            state.epoch_sums = [tr_loss, tr_correct, tr_n]
        state.samples_in_epoch = state.step_in_epoch * batches.effective_batch
        state.train_time_s = time.time() - t_start
        if (epoch_done and recipe.checkpoint.epoch_end) or stopping:
            ckpt.save(state)

    if state.global_step >= total_steps:
        status = "finished"
    else:
        status = "stopped" if stop_requested else "max_steps"
    summary = finish(accelerator, model, recipe, log, state, info, input_size, status)
    if status != "stopped":
        accelerator.print(
            f"alexdist: done at step {state.global_step} | final test acc {summary['final_test_acc']:.4f} "
            f"(best {state.best_acc:.4f} at epoch {state.best_epoch})"
        )
    return summary


def finish(accelerator, model, recipe: Recipe, log: RunLog, state: TrainState, info: dict, input_size: int,
           status: str) -> dict:
    """Final weights (one safetensors file with the model's name and input size), summary, trackers closed.

    A run stopped on request keeps its weights in the checkpoint it just wrote and skips the export.
    """
    state_dict = accelerator.get_state_dict(model) if status != "stopped" else None  # ZeRO-3: a collective
    if accelerator.is_main_process and state_dict is not None:
        from safetensors.torch import save_file

        out = Path(recipe.output_dir) / "model.safetensors"
        tmp = out.with_suffix(".tmp")
        meta = {"model": recipe.model.name, "input_size": str(input_size), "width_mult": str(recipe.model.width_mult),
                "dropout": str(recipe.model.dropout), "step": str(state.global_step), "data_source": recipe.data.source,
                "data": json.dumps(recipe.data.model_dump(exclude={"cache_dir"}))}
        # A compiled model's state dict names its parameters `_orig_mod.*`: save the model's own names.
        weights = {k.removeprefix("_orig_mod."): v.detach().float().contiguous() for k, v in state_dict.items()}
        save_file(weights, str(tmp), metadata=meta)
        tmp.replace(out)
    # A checksum of every rank's parameters: equal values prove the ranks stayed in sync (ZeRO-3 ranks hold
    # partitions, not whole parameters, so there is nothing to compare).
    rank_sums = None
    if info.get("zero_stage") != 3:
        local = sum(p.detach().double().sum() for p in plain_module(accelerator, model).parameters())
        rank_sums = accelerator.gather(local.reshape(1).to(accelerator.device)).tolist()
    summary = {
        "status": status,
        "recipe": recipe.name, "model": recipe.model.name, "precision": recipe.precision, **info,
        "epochs_run": state.epoch + (1 if state.step_in_epoch else 0), "steps": state.global_step,
        "final_test_acc": state.test_acc, "final_test_loss": state.test_loss,
        "best_test_acc": state.best_acc, "best_epoch": state.best_epoch,
        "target_acc": recipe.tracking.target_acc, "time_to_target_s": state.time_to_target_s,
        "epoch_to_target": state.epoch_to_target,
        "images_per_s": sum(state.images_per_s) / max(1, len(state.images_per_s)),
        "train_time_s": round(state.train_time_s, 2), "git_commit": git_commit(), "rank_param_sums": rank_sums,
        "wandb_run_id": state.wandb_run_id,
    }
    log.finish(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m alexdist.train",
        description="Train from a recipe. Overrides are dotted key=value pairs, e.g. train.epochs=5 model.name=alexnet.",
    )
    ap.add_argument("recipe", help="recipe YAML (see recipes/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    args = ap.parse_args(argv)
    try:
        summary = train(load_recipe(args.recipe, args.overrides))
    except AlexdistError as exc:
        if is_launch_rank_zero():  # every rank hits the same error: say it once
            print(f"alexdist: error: {exc}", file=sys.stderr)
        elif launched_world_size() > 1:
            # The launcher kills the other ranks as soon as one exits: give rank 0 time to say what is wrong.
            time.sleep(3)
        return exc.exit_code
    except RuntimeError as exc:
        if not lost_peer(exc):
            raise
        # Another process died (or hung past distributed.timeout_s) and this one's collective failed.
        detail = re.sub(r"^\[[^]]*\] ", "", str(exc).strip().splitlines()[0]).split(". ")[0][:120]
        print(
            f"alexdist: error: rank {os.environ.get('RANK', '0')} lost contact with the other processes "
            f"({detail}); the run continues from its last "
            f"complete checkpoint when relaunched (checkpoint.resume=auto)",
            file=sys.stderr,
        )
        return 1
    return STOPPED_EXIT_CODE if summary["status"] == "stopped" else 0


if __name__ == "__main__":
    exit_now(main())
