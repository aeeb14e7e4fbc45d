"""Building the Accelerator: processes, backend, precision, accumulation and trackers from the recipe.

CPU-only machines are first class. Two traps, both checked on accelerate 1.15 / torch 2.14:
- under `torchrun` or `accelerate launch --multi_gpu` with no CUDA, a plain `Accelerator()` runs every rank
  alone (num_processes=1, no gradient sync); the gloo backend alone forms one process group but still leaves
  the model without DDP (distributed_type NO); `cpu=True` with gloo gives MULTI_CPU and real DDP;
- Accelerate runs fp16 on a CPU as plain fp32 without a word, so we refuse it.
What differs per strategy (DeepSpeed's plugin, `cpu=`, autocast) comes from Strategy.accelerator_kwargs.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from alexdist.config import Recipe
from alexdist.errors import SetupError
from alexdist.ranks import launched_world_size

if TYPE_CHECKING:  # the strategy's base imports this module's amp_mode
    from alexdist.distributed.strategy import Strategy


def amp_mode(precision: str) -> str:
    """Accelerate's mixed_precision for a recipe precision (fp64 is a dtype, not a mixed precision)."""
    return "no" if precision == "fp64" else precision


def _check_launcher_precision(recipe: Recipe) -> None:
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched not in ("no", amp_mode(recipe.precision)):
        raise SetupError(
            f"the launcher says --mixed_precision {launched} but the recipe says precision={recipe.precision}; "
            f"set precision={launched} or launch with --mixed_precision {recipe.precision}"
        )


def local_processes() -> int:
    """How many processes the launcher started on this node (torchrun's LOCAL_WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def gpu_plan(processes: int, gpus: int) -> str | None:
    """What to say about `processes` on a node with `gpus` visible GPUs: an error (more processes than GPUs: each
    rank would ask for a GPU that is not there) starts with "error:", a note (GPUs left idle) does not."""
    if gpus == 0 or processes == gpus:
        return None
    if processes > gpus:
        return (f"error:{processes} processes on this node but {gpus} GPU{'s' if gpus > 1 else ''} visible; launch "
                f"--num_processes {gpus}, or run on the CPU with CUDA_VISIBLE_DEVICES= (as `make quickstart` does)")
    return (f"{processes} process{'es' if processes > 1 else ''} on this node but {gpus} GPUs visible: "
            f"{gpus - processes} stay idle; launch --num_processes {gpus} to use them (the packaged accelerate "
            f"configs say 2)")


def make_accelerator(recipe: Recipe, strategy: Strategy, log_with: list[str] | None = None) -> Accelerator:
    """The Accelerator for a resolved strategy (distributed.strategy.resolve_strategy)."""
    plan = gpu_plan(local_processes(), torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if plan and plan.startswith("error:"):
        raise SetupError(plan.removeprefix("error:"))
    if plan and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"alexdist: note: {plan}", file=sys.stderr, flush=True)
    if recipe.precision == "fp16" and not torch.cuda.is_available():
        raise SetupError(
            "precision=fp16 needs a GPU (on a CPU Accelerate silently trains in fp32); use precision=bf16 or "
            "precision=no"
        )
    _check_launcher_precision(recipe)
    # Setup (rank 0 decoding the dataset while the others wait, a first compilation) may take long; the
    # shorter distributed.step_timeout_s applies from the first optimizer step on (collectives.set_step_timeout).
    timeout = timedelta(seconds=max(recipe.distributed.setup_timeout_s, recipe.distributed.step_timeout_s))
    if not torch.cuda.is_available() and launched_world_size() > 1:
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    else:
        handlers = [InitProcessGroupKwargs(timeout=timeout)]
    kwargs = strategy.accelerator_kwargs(recipe)
    if "deepspeed_plugin" not in kwargs:
        quiet_unused_deepspeed()
    accelerator = Accelerator(
        **kwargs,
        # We size schedules in optimizer steps and step the scheduler once per optimizer step ourselves;
        # Accelerate's default would step it once per process.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
        log_with=log_with or None,
        dynamo_plugin=dynamo_plugin(recipe),  # speed.compile
        # TensorBoard (tracking.log_with) writes under logging_dir.
        project_config=ProjectConfiguration(project_dir=recipe.output_dir,
                                            logging_dir=os.path.join(recipe.output_dir, "tensorboard")),
    )
    strategy.confirm_accelerator(accelerator)
    if accelerator.num_processes != launched_world_size() or (
        accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO
    ):
        raise SetupError(
            f"the launcher started {launched_world_size()} processes but they formed a group of "
            f"{accelerator.num_processes}; check the launch command (on a CPU use `accelerate launch --multi_gpu "
            f"--num_processes N` or `torchrun --nproc_per_node N`)"
        )
    return accelerator


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_unused_deepspeed() -> None:
    """Keep DeepSpeed's warnings out of runs that do not use it. Accelerate's unwrap_model imports DeepSpeed
    whenever it is installed (alexdist's `unwrap` spares runs that compile nothing), and that import warns
    "Setting accelerator to CPU" once per process on a CPU. A filter, not a level: DeepSpeed sets its logger's
    level when it is imported."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ErrorsOnly) for f in logger.filters):
        logger.addFilter(_ErrorsOnly())


def unwrap(accelerator: Accelerator, model: torch.nn.Module, keep_torch_compile: bool = True) -> torch.nn.Module:
    """`accelerator.unwrap_model(model, keep_torch_compile=...)`, without importing what the model cannot be.
    Accelerate's looks for DeepSpeed's engine by importing DeepSpeed (0.2 s per process) and for torch.compile's
    wrapper by importing torch._dynamo (~1.2 s, with sympy, pandas and scikit-learn, where DDP has not imported
    it), and asks which packages are installed on every call (~7 ms). An object of a class whose module was never
    imported cannot exist: without DeepSpeed imported and without a compiled module in the model, Accelerate's
    answer is the module inside DDP's, DataParallel's or FSDP1's wrapper (its fp32 autocast wrapper kept, as
    unwrap_model keeps it)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = eval_frame is not None and any(isinstance(m, eval_frame.OptimizedModule) for m in model.modules())
    if compiled or "deepspeed" in sys.modules:
        return accelerator.unwrap_model(model, keep_torch_compile=keep_torch_compile)
    wrappers: tuple[type, ...] = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    fsdp1 = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    if fsdp1 is not None:
        wrappers += (fsdp1.FullyShardedDataParallel,)
    while isinstance(model, wrappers):
        model = model.module
    return model


def dynamo_plugin(recipe: Recipe):
    """Accelerate's TorchDynamoPlugin for speed.compile (None: no compilation, whatever the launcher's env says)."""
    from accelerate.utils import TorchDynamoPlugin

    return TorchDynamoPlugin(backend="inductor" if recipe.speed.compile else "no")
