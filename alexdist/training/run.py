"""One training run, as `build_run` builds it: every piece the loop reads, complete from the start."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alexdist.checkpoint.checkpointer import Checkpointer
from alexdist.checkpoint.run_dir import RunLock
from alexdist.checkpoint.state import TrainState
from alexdist.config import Recipe
from alexdist.data.interface import Batches, EvalSet
from alexdist.distributed.gradient_probe import GradientProbe
from alexdist.distributed.strategy import Strategy
from alexdist.tracking.profiling import StepProfiler
from alexdist.tracking.runlog import RunLog
from alexdist.training.divergence import DivergenceGuard
from alexdist.training.ema import ModelEMA
from alexdist.training.evaluation import EpochMeter
from alexdist.training.noise_scale import GradientNoiseScale
from alexdist.training.stop_requests import StopRequests


@dataclass(kw_only=True)
class Run:
    """The recipe, the strategy and what it prepared, the data, and the run's bookkeeping: every field set by
    `build_run`, by keyword."""

    recipe: Recipe
    accelerator: object
    strategy: Strategy
    model: torch.nn.Module
    params: list[torch.nn.Parameter]  # the model's parameters, looked up once (unwrapping costs milliseconds)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Batches  # in memory or streamed: the loop does not know which
    val: EvalSet | None  # the validation split (data.val_split), None without one
    test: EvalSet
    classes: list[str]  # the data's class names; the head has one output each
    input_size: int
    in_dtype: torch.dtype  # what the model's inputs are cast to (Strategy.compute_dtype)
    total_steps: int  # the schedule's length: train.epochs x steps per epoch
    last_step: int  # where this attempt ends: train.max_steps, or the end
    stop_requests: StopRequests  # signals and the STOP file
    guard: DivergenceGuard
    checkpointer: Checkpointer
    log: RunLog
    state: TrainState
    info: dict  # the run's facts (metrics.jsonl's start event, summary.json)
    resumed_from: Path | None
    lock: RunLock | None  # rank 0's hold on output_dir
    t_start: float  # wall clock at which the run (all attempts together) would have begun
    ema: ModelEMA | None  # train.ema_decay
    profiler: StepProfiler  # tracking.profile_steps
    probe: GradientProbe | None  # tracking.noise_scale: where the step's small-batch gradient is seen
    noise: GradientNoiseScale | None  # ...and the estimate
    meter: EpochMeter  # this epoch's loss/accuracy sums (a new one each epoch)

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
        state.noise_scale = self.noise.state_dict() if self.noise else None

    def save_if_due(self, *, epoch_end: bool = False, final: bool = False) -> Path | None:
        """A checkpoint if the Checkpointer's policy says so (`final`: the run stops here)."""
        return self.checkpointer.maybe_save(self.state, self.snapshot, epoch_end=epoch_end, final=final)
