"""Everything a training run is made of, built from a recipe in one place: `build_run(recipe) -> Run`.

Order matters for exact resume and for equal runs on any number of processes: the initial weights come from
`train.seed` before anything else draws random numbers; the per-rank seed for dropout is set after `prepare`;
a checkpoint, if any, is loaded last (it restores every rank's RNG state).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from alexdist.checkpoint.checkpointer import Checkpointer
from alexdist.checkpoint.config_changes import saved_config
from alexdist.checkpoint.run_dir import RunLock, check_writable, checkpoint_bytes
from alexdist.checkpoint.state import TrainState, read_state
from alexdist.config import Recipe, sweep_output_dir
from alexdist.data.interface import Batches
from alexdist.distributed.accelerator import make_accelerator
from alexdist.distributed.collectives import from_main, plain_module
from alexdist.distributed.launcher import elastic_facts, shared_store_warning, train_command
from alexdist.distributed.strategies import resolve_strategy
from alexdist.distributed.strategy import Strategy
from alexdist.errors import ConfigError, SetupError
from alexdist.fileio import check_space
from alexdist.models import build_model, count_params, keep_batchnorm_fp32, resolve_input_size
from alexdist.ranks import launched_world_size
from alexdist.tracking.profiling import StepProfiler
from alexdist.tracking.runlog import RunLog
from alexdist.tracking.summary import describe_run
from alexdist.tracking.trackers import trackers
from alexdist.training.divergence import DivergenceGuard
from alexdist.training.ema import ModelEMA
from alexdist.training.evaluation import EpochMeter
from alexdist.training.noise_scale import GradientNoiseScale
from alexdist.training.optim import (
    LRSchedule,
    apply_recipe_settings,
    make_optimizer,
    optimizer_settings,
    peak_lr,
    resumed_anchor,
    schedule_step,
    warmup_steps,
)
from alexdist.training.precision import configure_cuda_math
from alexdist.training.run import Run
from alexdist.training.run_data import RunData, run_data
from alexdist.training.stop_requests import StopRequests


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


def build_run(recipe: Recipe) -> Run:
    """Strategy, Accelerator, data, the run directory held, model, optimizer, schedule, checkpointer, trackers, and
    the resume if there is one."""
    sweep_output_dir(recipe)
    check_writable(recipe.output_dir)  # before any work: an unwritable output_dir would lose it all
    resolve_batch_size(recipe, launched_world_size())
    strategy = resolve_strategy(recipe)
    accelerator = make_accelerator(recipe, strategy, log_with=trackers(recipe))
    configure_cuda_math(recipe.speed.tf32, recipe.speed.cudnn_benchmark)
    data = run_data(recipe, accelerator)
    lock = hold_run_dir(accelerator, recipe.output_dir)  # nothing is written into output_dir before this
    try:
        return _build(recipe, accelerator, strategy, data, lock)
    except BaseException:
        if lock:
            lock.release()
        raise


def hold_run_dir(accelerator, output_dir: str) -> RunLock | None:
    """Rank 0 takes output_dir for this run (run_dir.RunLock); every rank stops if another run holds it."""
    lock = RunLock(output_dir) if accelerator.is_main_process else None
    refused = from_main(accelerator, lock.acquire() if lock else None)
    if refused:
        raise SetupError(refused)
    return lock


def _build(recipe: Recipe, accelerator, strategy: Strategy, data: RunData, lock: RunLock | None) -> Run:
    batches = data.batches
    stop_requests = StopRequests(accelerator, recipe.output_dir)  # SIGTERM / SIGUSR1 / SIGHUP / output_dir/STOP
    total_steps = recipe.train.epochs * batches.steps_per_epoch
    model, optimizer, scheduler, n_params, schedule = _model_and_optimizer(recipe, accelerator, strategy, batches,
                                                                           total_steps, len(data.classes))
    # Dropout masks come from the global RNG: distinct per rank (as with separate GPUs), reproducible per seed.
    torch.manual_seed(recipe.train.seed * 1000 + accelerator.process_index + 1)
    ema = _ema(recipe, accelerator, strategy, model)  # before the resume, which restores it
    probe, noise = _noise_scale(recipe, accelerator, strategy, model, batches.effective_batch)
    checkpointer = Checkpointer(accelerator, recipe, strategy, model, optimizer, batches.steps_per_epoch,
                                data.val_fingerprint, (data.loader, data.fingerprint))
    state = TrainState(effective_batch=batches.effective_batch, world_size=accelerator.num_processes,
                       strategy=strategy.name, zero_stage=strategy.zero_stage, classes=data.classes,
                       selected_on="val" if data.val is not None else "test", val_fingerprint=data.val_fingerprint,
                       data_loader=data.loader, data_fingerprint=data.fingerprint)
    resumed_from = _resume(checkpointer, batches, accelerator)
    previous_world = read_state(resumed_from).world_size if resumed_from else accelerator.num_processes
    if resumed_from:
        settings = optimizer_settings(optimizer)  # the recipe's, before the checkpoint's overwrite them
        state = checkpointer.load(resumed_from)
        ended = _apply_recipe(recipe, resumed_from, state, optimizer, scheduler, settings, schedule, batches)
        accelerator.step = 0  # Accelerate restores its micro-step count: every step starts its accumulation anew
        if noise and state.noise_scale:
            noise.load_state_dict(state.noise_scale)
    # What the batches normalize with: on a resume the checkpoint's own figures (run_data_streamed's
    # _normalization), so this rewrites them unchanged; also over an older checkpoint's None.
    state.normalization = {"mean": list(data.mean), "std": list(data.std)}
    input_size = resolve_input_size(recipe.model.name, recipe.model.input_size)
    # The schedule is sized by epochs; max_steps only stops early, so a capped run resumes into the full one.
    last_step = min(total_steps, recipe.train.max_steps or total_steps)
    info = _facts(recipe, accelerator, strategy, data, total_steps, last_step, n_params, input_size, state,
                  resumed_from)
    if isinstance(probe, str):  # said below only where the recipe asked; recorded always
        info["noise_scale_not_measured"] = probe
    log = RunLog(accelerator, recipe)
    ends_at_once = state.evaluated and (state.target_reached or state.global_step >= last_step)  # as train() ends
    state.wandb_run_id = log.start(info, resume_step=state.global_step if resumed_from else None,
                                   run_id=state.wandb_run_id, ends_at_once=ends_at_once)
    log.say(describe_run(recipe, accelerator.num_processes, accelerator.device, strategy.describe(), batches, info,
                         n_params, resumed_from, state.global_step))
    # On by default: where it cannot be measured (one process, ZeRO, FSDP2) only a recipe that asked for it hears
    # why, or every quick one-process run would start with the notice.
    if isinstance(probe, str) and "noise_scale" in recipe.tracking.model_fields_set:
        log.say(f"alexdist: the gradient noise scale is not measured: {probe}")
    _say_reformed(log, info, previous_world, state)
    if resumed_from and ended:
        log.say(f"alexdist: warning: {ended}")
    return Run(
        recipe=recipe, accelerator=accelerator, strategy=strategy, model=model, params=list(model.parameters()),
        optimizer=optimizer, scheduler=scheduler, batches=batches, val=data.val, test=data.test,
        classes=data.classes, input_size=input_size,
        in_dtype=strategy.compute_dtype(recipe.precision), total_steps=total_steps, last_step=last_step,
        stop_requests=stop_requests, guard=DivergenceGuard(accelerator, optimizer, recipe, strategy),
        checkpointer=checkpointer, log=log, state=state, info=info, resumed_from=resumed_from, lock=lock,
        t_start=time.time() - state.train_time_s, ema=ema,
        profiler=StepProfiler(recipe.tracking.profile_steps, recipe.output_dir, accelerator.is_main_process),
        probe=None if isinstance(probe, str) else probe, noise=noise,
        meter=EpochMeter(accelerator.device),
    )


def _noise_scale(recipe: Recipe, accelerator, strategy: Strategy, model, effective_batch: int):
    """tracking.noise_scale: (the strategy's gradient probe, or why there is none; the estimator or None)."""
    if not recipe.tracking.noise_scale:
        return None, None
    probe = strategy.gradient_probe(accelerator, model, recipe)
    if isinstance(probe, str):
        return probe, None
    return probe, GradientNoiseScale(probe.b_small, effective_batch)


def _ema(recipe: Recipe, accelerator, strategy: Strategy, model: torch.nn.Module) -> ModelEMA | None:
    """train.ema_decay's average, registered for checkpointing; refused where the strategy cannot keep one."""
    t = recipe.train
    if t.ema_decay is None:
        return None
    if why := strategy.ema_refusal(recipe.precision):
        raise SetupError(f"train.ema_decay is not supported with {why}, or drop train.ema_decay")
    ema = ModelEMA(plain_module(accelerator, model), t.ema_decay, t.ema_warmup)
    accelerator.register_for_checkpointing(ema)  # custom_checkpoint_0.pkl in every checkpoint
    return ema


def _model_and_optimizer(recipe: Recipe, accelerator, strategy: Strategy, batches: Batches,
                         total_steps: int, num_classes: int):
    """The model (the same initial weights on every rank and world size), optimizer and schedule, prepared."""
    torch.manual_seed(recipe.train.seed)
    m = recipe.model
    model = build_model(m.name, resolve_input_size(m.name, m.input_size), m.dropout, m.width_mult, num_classes)
    model = model.to(accelerator.device)
    if recipe.precision == "fp64":
        model = model.double()
    if strategy.fp32_batchnorm(recipe.precision, recipe.speed.bn_fp32):
        keep_batchnorm_fp32(model)
    n_params = count_params(model)
    check_space(recipe.output_dir, 2 * checkpoint_bytes(n_params, recipe, strategy.master_copies))
    model = strategy.shard(model, recipe)  # before the optimizer: sharding replaces the parameters
    optimizer = make_optimizer(model, recipe, peak_lr(recipe.optim, batches.effective_batch))
    # A closure, not the object: LambdaLR would save a callable object's attributes and restore the old ones.
    schedule = LRSchedule(recipe.schedule, total_steps,
                          warmup_steps(recipe.schedule, total_steps, batches.steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s))
    return (*strategy.prepare(accelerator, model, optimizer, scheduler, recipe), n_params, schedule)


def _apply_recipe(recipe: Recipe, path: Path, state: TrainState, optimizer, scheduler, settings: list[dict],
                  schedule: LRSchedule, batches: Batches) -> str | None:
    """A resumed run trains with its recipe (checkpoint.allow_config_change let any change through): the
    recipe's optimizer settings, peak lr and schedule from the resumed step on, over the checkpoint's state.
    Returns a warning when added epochs would train at a decayed-out lr of 0."""
    saved = saved_config(path) or {}
    position = schedule_step(scheduler)
    schedule.anchor = resumed_anchor(saved, recipe, state.schedule_anchor, position, batches.steps_per_epoch)
    state.schedule_anchor = schedule.anchor
    apply_recipe_settings(optimizer, scheduler, settings, schedule)
    if schedule.anchor and schedule.total > position and schedule(position) == 0:
        return (f"the schedule had decayed to schedule.final_frac=0 by step {position}: the added epochs train at "
                f"lr 0; to train on, start a new decay (change optim.lr or schedule.*, e.g. schedule.final_frac)")
    return None


def _resume(checkpointer: Checkpointer, batches: Batches, accelerator) -> Path | None:
    """The checkpoint to continue from, if checkpoint.resume finds one; its effective batch must be this run's."""
    path = checkpointer.resume_path()
    if path is None:
        return None
    saved, effective = read_state(path).effective_batch, batches.effective_batch
    if saved != effective:  # checked before loading anything (or converting a ZeRO checkpoint)
        raise ConfigError(
            f"{path} was trained with an effective batch of {saved}, this run has {effective} "
            f"({accelerator.num_processes} processes); set train.global_batch={saved} to "
            f"keep the data position and schedule"
        )
    return path


def _backend() -> str | None:
    """The process group's backend (nccl, gloo), None without one (Accelerate's single-process mode)."""
    dist = torch.distributed
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def _facts(recipe: Recipe, acc, strategy: Strategy, data: RunData, total_steps: int, last_step: int,
           n_params: int, input_size: int, state: TrainState, resumed: Path | None) -> dict:
    """The run's facts: config.yaml's companions in metrics.jsonl's start event, W&B and summary.json."""
    b = data.batches
    return {
        "world_size": acc.num_processes, "strategy": strategy.name, "zero_stage": strategy.zero_stage,
        "effective_batch": b.effective_batch, "batch_size_per_process": recipe.train.batch_size,
        "steps_per_epoch": b.steps_per_epoch, "total_steps": total_steps, "last_step": last_step,
        "peak_lr": peak_lr(recipe.optim, b.effective_batch),
        "warmup_steps": warmup_steps(recipe.schedule, total_steps, b.steps_per_epoch), "params": n_params,
        "input_size": input_size, "train_images": data.train_images, "val_images": len(data.val) if data.val else 0,
        "data_loader": data.loader, "data_workers": getattr(b, "workers", None), "data_fingerprint": data.fingerprint,
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "val_split": data.val_fingerprint, "device": str(acc.device), "distributed_type": str(acc.distributed_type),
        "backend": _backend(), "command": train_command(acc.num_processes),
        "resumed_from": str(resumed) if resumed else None, "resumed_at_step": state.global_step,
        **elastic_facts(),
    }


def _say_reformed(log: RunLog, info: dict, previous_world: int, state: TrainState) -> None:
    """A TorchElastic restart or a group re-formed on another world size: one event (metrics.jsonl and the
    trackers) and one line, on the main process; and torchrun's shared-store hazard, if it applies."""
    if warning := shared_store_warning():
        log.say(f"alexdist: warning: {warning}")
    if not info["restart_count"] and previous_world == info["world_size"]:
        return
    log.event("reformed", state.global_step, state.epoch, restart_count=info["restart_count"],
              max_restarts=info["max_restarts"], world_size=info["world_size"], previous_world_size=previous_world)
    log.say(f"alexdist: the group re-formed (restart {info['restart_count']} of {info['max_restarts']}): "
            f"{previous_world} -> {info['world_size']} processes, resuming at step {state.global_step}")
