"""Building the Accelerator: processes, backend, precision, accumulation and trackers from the recipe.

CPU-only machines are first class. Two traps, both checked on accelerate 1.15 / torch 2.14:
- under `torchrun` or `accelerate launch --multi_gpu` with no CUDA, a plain `Accelerator()` runs every rank
  alone (num_processes=1, no gradient sync); the gloo backend alone forms one process group but still leaves
  the model without DDP (distributed_type NO); `cpu=True` with gloo gives MULTI_CPU and real DDP;
- Accelerate runs fp16 on a CPU as plain fp32 without a word, so we refuse it.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from alexdist.config import Recipe
from alexdist.errors import SetupError


def launched_world_size() -> int:
    """World size announced by the launcher (torchrun / accelerate launch), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_launch_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def make_accelerator(recipe: Recipe, log_with: list[str] | None = None) -> Accelerator:
    if recipe.precision == "fp16" and not torch.cuda.is_available():
        raise SetupError(
            "precision=fp16 needs a GPU (on a CPU Accelerate silently trains in fp32); use precision=bf16 or "
            "precision=no"
        )
    handlers = []
    if not torch.cuda.is_available() and launched_world_size() > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        # For DDP, `cpu=True` is what makes Accelerate treat gloo ranks as MULTI_CPU and wrap the model in DDP;
        # the gloo backend alone forms the group but leaves the model unwrapped (no gradient sync).
        cpu=not torch.cuda.is_available(),
        mixed_precision=recipe.precision,
        gradient_accumulation_steps=recipe.train.grad_accum,
        # We size schedules in optimizer steps and step the scheduler once per optimizer step ourselves;
        # Accelerate's default would step it once per process.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
        log_with=log_with or None,
        project_dir=recipe.output_dir,
    )
    if accelerator.num_processes != launched_world_size() or (
        accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO
    ):
        raise SetupError(
            f"the launcher started {launched_world_size()} processes but they formed a group of "
            f"{accelerator.num_processes}; check the launch command (on a CPU use `accelerate launch --multi_gpu "
            f"--num_processes N` or `torchrun --nproc_per_node N`)"
        )
    return accelerator


def exit_now(code: int) -> None:
    """Leave without running interpreter teardown.

    With gloo, about 1 run in 8 aborts at interpreter exit ("terminate called without an active exception",
    pytorch#190489: a gloo thread outlives the Python objects it refers to), after training has finished.
    Everything we write is closed and flushed before this is called, so skipping teardown loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
