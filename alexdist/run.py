"""Everything a training run is made of, built from a recipe in one place: `setup(recipe) -> Run`.

Order matters for exact resume and for equal runs on any number of processes: the initial weights come from
`train.seed` before anything else draws random numbers; the per-rank seed for dropout is set after `prepare`;
a checkpoint, if any, is loaded last (it restores every rank's RNG state).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alexdist import faults
from alexdist.batches import TrainBatches
from alexdist.checkpoint import Checkpointer, TrainState, read_state
from alexdist.config import Recipe
from alexdist.data import load_dataset
from alexdist.distributed import from_main, make_accelerator, plain_module, resolve_strategy
from alexdist.ema import ModelEMA
from alexdist.errors import ConfigError, SetupError
from alexdist.fsdp import shard_model
from alexdist.guard import DivergenceGuard
from alexdist.launcher import launched_world_size, train_command
from alexdist.metrics import EpochMeter
from alexdist.models import build_model, count_params, resolve_input_size
from alexdist.optim import lr_factor, make_optimizer
from alexdist.precision import (
    compute_dtype,
    configure_cuda_math,
    keep_batchnorm_fp32,
    needs_fp32_batchnorm,
    restore_fp32_buffers,
)
from alexdist.profiling import StepProfiler
from alexdist.rundir import RunLock, check_space, check_writable, checkpoint_bytes
from alexdist.stopping import StopRequest
from alexdist.tracking import RunLog, trackers


@dataclass
class Run:
    """One training run: the recipe, what Accelerate prepared, the data, and the run's bookkeeping."""

    recipe: Recipe
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: TrainBatches
    test_x: torch.Tensor
    test_y: torch.Tensor
    strategy: str
    zero_stage: int | None
    input_size: int
    in_dtype: torch.dtype  # what the model's inputs are cast to (precision.compute_dtype)
    total_steps: int  # the schedule's length: train.epochs x steps per epoch
    stop_step: int  # where this attempt ends: train.max_steps, or the end
    stop: StopRequest
    guard: DivergenceGuard
    ckpt: Checkpointer = None
    log: RunLog = None
    state: TrainState = field(default_factory=TrainState)
    info: dict = field(default_factory=dict)
    resumed_from: Path | None = None
    lock: RunLock | None = None  # rank 0's hold on output_dir
    t_start: float = 0.0  # wall clock at which the run (all attempts together) would have begun
    meter: EpochMeter | None = None  # this epoch's loss/accuracy sums
    classes: list[str] = field(default_factory=list)  # the data's class names; the head has one output each
    ema: ModelEMA | None = None  # train.ema_decay
    profiler: StepProfiler | None = None  # speed.profile_steps

    @property
    def deepspeed(self) -> bool:
        return self.strategy == "deepspeed"

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    @property
    def sharded_forward(self) -> bool:
        """Whether every forward gathers parameters from the other ranks (a collective): ZeRO-3 and FSDP."""
        return (self.deepspeed and self.zero_stage == 3) or self.fsdp

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        if self.lock:
            self.lock.release()

    def snapshot(self, state: TrainState) -> None:
        """Bring `state` up to date for a checkpoint: the epoch's sums so far, agreed over ranks (a collective),
        and the training time. The one place a TrainState is prepared for saving."""
        state.epoch_sums = self.meter.total(self.accelerator) if state.step_in_epoch else [0.0, 0.0, 0.0]
        state.train_time_s = time.time() - self.t_start


def sweep_output_dir(recipe: Recipe) -> None:
    """A W&B sweep trial (started by `wandb agent`, which sets WANDB_SWEEP_ID and WANDB_RUN_ID) writes to
    output_dir/sweep-SWEEP/RUN: trials of one sweep share the recipe's output_dir, and with `resume: auto`
    each would otherwise continue the previous trial's checkpoints."""
    sweep, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and run_id and f"sweep-{sweep}" not in Path(recipe.output_dir).parts:
        recipe.output_dir = str(Path(recipe.output_dir) / f"sweep-{sweep}" / run_id)


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


def peak_lr(recipe: Recipe, effective_batch: int) -> float:
    """optim.lr, scaled linearly from optim.ref_batch to the run's effective batch (if ref_batch is set)."""
    o = recipe.optim
    return o.lr * (effective_batch / o.ref_batch if o.ref_batch else 1.0)


def setup(recipe: Recipe) -> Run:
    """Accelerator, data, the run directory held, model, optimizer, schedule, checkpointer, trackers, and the
    resume if there is one."""
    sweep_output_dir(recipe)
    check_writable(recipe.output_dir)  # before any work: an unwritable output_dir would lose it all
    resolve_batch_size(recipe, launched_world_size())
    strategy, zero_stage = resolve_strategy(recipe)
    accelerator = make_accelerator(recipe, strategy, zero_stage, log_with=trackers(recipe))
    configure_cuda_math(recipe.speed.tf32, recipe.speed.cudnn_benchmark)
    batches, test_x, test_y, classes = _data(recipe, accelerator)
    lock = hold_run_dir(accelerator, recipe.output_dir)  # nothing is written into output_dir before this
    try:
        run = _build(recipe, accelerator, strategy, zero_stage, batches, test_x, test_y, classes)
    except BaseException:
        if lock:
            lock.release()
        raise
    run.lock = lock
    return run


def hold_run_dir(accelerator, output_dir: str) -> RunLock | None:
    """Rank 0 takes output_dir for this run (rundir.RunLock); every rank stops if another run holds it."""
    lock = RunLock(output_dir) if accelerator.is_main_process else None
    refused = from_main(accelerator, lock.acquire() if lock else None)
    if refused:
        raise SetupError(refused)
    return lock


def _build(recipe: Recipe, accelerator, strategy: str, zero_stage: int | None, batches: TrainBatches,
           test_x: torch.Tensor, test_y: torch.Tensor, classes: list[str]) -> Run:
    stop = StopRequest(accelerator, recipe.output_dir)  # SIGTERM / SIGUSR1 / output_dir/STOP
    total_steps = recipe.train.epochs * batches.steps_per_epoch
    deepspeed = strategy == "deepspeed"
    model, optimizer, scheduler, n_params = _model_and_optimizer(recipe, accelerator, batches.effective_batch,
                                                                 total_steps, strategy, len(classes))
    # Dropout masks come from the global RNG: distinct per rank (as with separate GPUs), reproducible per seed.
    torch.manual_seed(recipe.train.seed * 1000 + accelerator.process_index + 1)
    run = Run(
        recipe, accelerator, model, optimizer, scheduler, batches, test_x, test_y, strategy, zero_stage,
        resolve_input_size(recipe.model.name, recipe.model.input_size), compute_dtype(recipe.precision, deepspeed),
        # The schedule is sized by epochs; max_steps only stops early, so a capped run resumes into the full one.
        total_steps, min(total_steps, recipe.train.max_steps or total_steps), stop,
        DivergenceGuard(accelerator, optimizer, recipe, deepspeed),
        state=TrainState(effective_batch=batches.effective_batch, world_size=accelerator.num_processes,
                         strategy=strategy, zero_stage=zero_stage, classes=classes),
        classes=classes,
    )
    run.ckpt = Checkpointer(accelerator, recipe, model, batches.steps_per_epoch, snapshot=run.snapshot,
                            sharded_optimizer=optimizer if run.fsdp else None)
    run.ema = _ema(run)  # before the resume, which restores it
    run.profiler = StepProfiler(recipe.speed.profile_steps, recipe.output_dir, accelerator.is_main_process)
    _resume(run)
    run.t_start = time.time() - run.state.train_time_s
    _start_log(run, n_params)
    return run


def _ema(run: Run) -> ModelEMA | None:
    """train.ema_decay's average, registered for checkpointing; refused where ranks hold shards of the weights."""
    t = run.recipe.train
    if t.ema_decay is None:
        return None
    if run.sharded_forward:
        what = "ZeRO-3" if run.deepspeed else "FSDP"
        raise SetupError(f"train.ema_decay is not supported with {what}, whose ranks hold shards of the weights; "
                         f"use DDP or ZeRO-1/2, or drop train.ema_decay")
    ema = ModelEMA(plain_module(run.accelerator, run.model), t.ema_decay, t.ema_warmup)
    run.accelerator.register_for_checkpointing(ema)  # custom_checkpoint_0.pkl in every checkpoint
    return ema


def _data(recipe: Recipe, accelerator) -> tuple[TrainBatches, torch.Tensor, torch.Tensor, list[str]]:
    """This rank's training batches, the test set (on the device, speed.data_on_device, or the host) and the
    class names."""
    t, device = recipe.train, accelerator.device
    ds = _load_once(recipe, accelerator)
    data_device = device if recipe.speed.data_on_device else torch.device("cpu")
    batches = TrainBatches(
        ds.train_x.to(data_device), ds.train_y.to(data_device), t.batch_size, t.grad_accum,
        accelerator.process_index, accelerator.num_processes, t.seed, recipe.augment,
        resolve_input_size(recipe.model.name, recipe.model.input_size),
    )
    if batches.steps_per_epoch == 0:
        raise ConfigError(
            f"the effective batch ({batches.effective_batch} = train.batch_size {t.batch_size} x "
            f"{accelerator.num_processes} processes x train.grad_accum {t.grad_accum}) is larger than the "
            f"{len(ds.train_y)} training images; lower train.batch_size or train.grad_accum"
        )
    return batches, ds.test_x.to(data_device), ds.test_y.to(data_device), ds.classes


def _load_once(recipe: Recipe, accelerator):
    """The dataset, decoded once per job when the cache is shared (rank 0 writes it, everyone else reads it) and
    once per node when data.cache_dir is node-local (each node's first process finds no cache and writes its own;
    the node's other processes then read it)."""
    ds = None
    if accelerator.is_main_process:
        faults.slow_setup_point()
        ds = load_dataset(recipe.data)
    accelerator.wait_for_everyone()
    with accelerator.local_main_process_first():
        if not accelerator.is_main_process:
            faults.slow_setup_point()
            ds = load_dataset(recipe.data)
    return ds


def _model_and_optimizer(recipe: Recipe, accelerator, effective_batch: int, total_steps: int, strategy: str,
                         num_classes: int):
    """The model (the same initial weights on every rank and world size), optimizer and schedule, prepared."""
    deepspeed = strategy == "deepspeed"
    torch.manual_seed(recipe.train.seed)
    m = recipe.model
    model = build_model(m.name, resolve_input_size(m.name, m.input_size), m.dropout, m.width_mult, num_classes)
    model = model.to(accelerator.device)
    if recipe.precision == "fp64":
        model = model.double()
    if recipe.speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if needs_fp32_batchnorm(recipe.precision, deepspeed, recipe.speed.bn_fp32):
        keep_batchnorm_fp32(model)
    n_params = count_params(model)
    check_space(recipe.output_dir, 2 * checkpoint_bytes(n_params, recipe))
    if strategy == "fsdp":
        shard_model(model, recipe.precision)  # before the optimizer: sharding replaces the parameters
    optimizer = make_optimizer(model, recipe, peak_lr(recipe, effective_batch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, recipe.schedule))
    if strategy == "fsdp":  # Accelerate would wrap the model in DDP and save the optimizer from rank 0 alone
        return model, optimizer, accelerator.prepare(scheduler), n_params
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if deepspeed and recipe.precision in ("fp16", "bf16"):
        restore_fp32_buffers(model)
    return model, optimizer, scheduler, n_params


def _resume(run: Run) -> None:
    """Continue from a checkpoint if checkpoint.resume finds one (weights, optimizer, RNG, data position)."""
    path = run.ckpt.resume_path()
    if path is None:
        return
    saved, effective = read_state(path).effective_batch, run.batches.effective_batch
    if saved != effective:  # checked before loading anything (or converting a ZeRO checkpoint)
        raise ConfigError(
            f"{path} was trained with an effective batch of {saved}, this run has {effective} "
            f"({run.accelerator.num_processes} processes); set train.global_batch={saved} to "
            f"keep the data position and schedule"
        )
    state = run.ckpt.load(path, run.strategy, run.accelerator.num_processes)
    state.world_size = run.accelerator.num_processes
    run.state, run.resumed_from = state, path


def _backend() -> str | None:
    """The process group's backend (nccl, gloo), None without one (Accelerate's single-process mode)."""
    dist = torch.distributed
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def _start_log(run: Run, n_params: int) -> None:
    """The run's facts (config.yaml, metrics.jsonl's start event, W&B) and the one line that describes it."""
    r, acc, state, b = run.recipe, run.accelerator, run.state, run.batches
    resumed = run.resumed_from
    run.info = {
        "world_size": acc.num_processes, "strategy": run.strategy, "zero_stage": run.zero_stage,
        "effective_batch": b.effective_batch, "batch_size_per_process": r.train.batch_size,
        "steps_per_epoch": b.steps_per_epoch, "total_steps": run.total_steps, "stop_step": run.stop_step,
        "peak_lr": peak_lr(r, b.effective_batch), "params": n_params, "input_size": run.input_size,
        "device": str(acc.device), "distributed_type": str(acc.distributed_type), "backend": _backend(),
        "command": train_command(acc.num_processes),
        "resumed_from": str(resumed) if resumed else None, "resumed_at_step": state.global_step,
    }
    run.log = RunLog(acc, r)
    state.wandb_run_id = run.log.start(run.info, resume_step=state.global_step if resumed else None,
                                       run_id=state.wandb_run_id)
    zero = f" ZeRO-{run.zero_stage}" if run.deepspeed else ""
    run.log.say(
        f"alexdist: {r.model.name} @ {run.input_size}px ({n_params / 1e6:.2f} M params) on {acc.num_processes} x "
        f"{acc.device}, {run.strategy}{zero} | effective batch {b.effective_batch} = {r.train.batch_size} per "
        f"process x {acc.num_processes} processes x {r.train.grad_accum} accumulation | {b.steps_per_epoch} "
        f"steps/epoch, {run.total_steps} steps, peak lr {run.info['peak_lr']:.4g} | precision {r.precision} | "
        f"output {r.output_dir}" + (f" | resumed from {resumed} at step {state.global_step}" if resumed else "")
    )
