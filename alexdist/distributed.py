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
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from alexdist.config import Recipe
from alexdist.errors import SetupError
from alexdist.launcher import launched_world_size


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def resolve_strategy(recipe: Recipe) -> tuple[str, int | None]:
    """(strategy, zero_stage) from the recipe and the launcher, by one rule; written back into the recipe.

    The launcher speaks through the environment `accelerate launch` sets from its config file. A recipe value
    of `auto` follows the launcher (DDP if it says nothing); an explicit recipe value must agree with the
    launcher, else the run stops with both values shown. Nothing is resolved silently, and the resolved values
    are what config.yaml and the trackers record.
    """
    strategy, stage = _resolve(recipe)
    d = recipe.distributed
    d.strategy = strategy
    if stage is not None:
        d.zero_stage = stage
    if os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower() == "cpu":
        d.offload_optimizer = True
    return strategy, stage


def _resolve(recipe: Recipe) -> tuple[str, int | None]:
    d = recipe.distributed
    if _env_flag("ACCELERATE_USE_FSDP"):  # `accelerate launch --use_fsdp` or recipes/accelerate/fsdp.yaml
        if d.strategy not in ("auto", "fsdp"):
            raise SetupError(
                f"the launcher config says FSDP but the recipe says distributed.strategy={d.strategy}; drop one of "
                f"them (distributed.strategy=auto follows the launcher)"
            )
        return "fsdp", None
    launcher_ds = _env_flag("ACCELERATE_USE_DEEPSPEED")
    launcher_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if d.strategy == "ddp" and launcher_ds:
        raise SetupError(
            "the launcher config says DeepSpeed but the recipe says distributed.strategy=ddp; drop one of them "
            "(distributed.strategy=auto follows the launcher)"
        )
    if launcher_ds:
        stage = int(launcher_stage) if launcher_stage else d.zero_stage
        if d.strategy == "deepspeed" and launcher_stage and stage != d.zero_stage:
            raise SetupError(
                f"the launcher config says ZeRO stage {stage} but the recipe says distributed.zero_stage="
                f"{d.zero_stage}; make them agree or set distributed.strategy=auto to follow the launcher"
            )
        gas = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
        if gas and gas.isdigit() and int(gas) != recipe.train.grad_accum:
            raise SetupError(
                f"the launcher config says gradient_accumulation_steps={gas} but the recipe says train.grad_accum="
                f"{recipe.train.grad_accum}; set it in one place (the recipe is the usual one)"
            )
        return "deepspeed", stage
    if d.strategy in ("deepspeed", "fsdp"):
        return d.strategy, d.zero_stage if d.strategy == "deepspeed" else None
    return "ddp", None


def _check_fsdp(recipe: Recipe) -> None:
    """What FSDP2 here does not do, refused in one line before any work."""
    if recipe.precision == "fp16":
        raise SetupError(
            "precision=fp16 is not supported with distributed.strategy=fsdp (FSDP2 would need a sharded gradient "
            "scaler); use precision=bf16, or fp16 with the ddp or deepspeed strategy"
        )
    if recipe.speed.compile:
        raise SetupError("speed.compile is not supported with distributed.strategy=fsdp yet; set speed.compile=false "
                         "or use the ddp strategy")
    if recipe.distributed.offload_optimizer:
        raise SetupError("distributed.offload_optimizer is a DeepSpeed (ZeRO-Offload) option; drop it with "
                         "distributed.strategy=fsdp, or use distributed.strategy=deepspeed")


def _take_fsdp_launcher_env() -> None:
    """FSDP2 is applied by alexdist.fsdp; left in the environment, the launcher's FSDP settings would make
    Accelerate build its own FSDP plugin (which refuses CPU-only machines) and clip through it."""
    for key in [k for k in os.environ if k.startswith(("FSDP_", "ACCELERATE_FSDP_"))] + ["ACCELERATE_USE_FSDP"]:
        os.environ.pop(key, None)


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


def deepspeed_plugin(recipe: Recipe, stage: int):
    """A DeepSpeedPlugin from an explicit DeepSpeed config, so every setting is visible here."""
    import importlib.util

    from accelerate.utils import DeepSpeedPlugin

    if importlib.util.find_spec("deepspeed") is None:
        raise SetupError("distributed.strategy=deepspeed needs DeepSpeed: pip install 'alexdist[deepspeed]'")
    if importlib.util.find_spec("transformers") is None:
        # Accelerate 1.15's plugin setup reads transformers' version for a ZeRO-3 hook that only transformers
        # models use; without transformers installed it raises PackageNotFoundError.
        DeepSpeedPlugin.set_deepspeed_weakref = lambda self: None
    # The launcher's DeepSpeed settings are already merged into the recipe's (resolve_strategy); Accelerate
    # refuses an explicit config while they are still in the environment.
    for key in [k for k in os.environ if k.startswith("ACCELERATE_DEEPSPEED_")] + [
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_CONFIG_DS_FIELDS"
    ]:
        os.environ.pop(key, None)
    d, t = recipe.distributed, recipe.train
    config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip or 0.0,
        "zero_optimization": {
            "stage": stage,
            "offload_optimizer": {"device": "cpu" if d.offload_optimizer else "none"},
            "stage3_gather_16bit_weights_on_model_save": True,  # get_state_dict() gathers full weights
        },
        "zero_allow_untested_optimizer": True,  # our SGD is a plain torch optimizer
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {
            "enabled": recipe.precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": d.fp16_initial_scale_power,
            "loss_scale_window": d.fp16_loss_scale_window,
            "hysteresis": d.fp16_hysteresis,
            "min_loss_scale": d.fp16_min_loss_scale,  # an int: DeepSpeed validates it as one
        },
        "bf16": {"enabled": recipe.precision == "bf16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return DeepSpeedPlugin(hf_ds_config=config)


def make_accelerator(
    recipe: Recipe, strategy: str, stage: int | None, log_with: list[str] | None = None
) -> Accelerator:
    """The Accelerator for a resolved strategy (see resolve_strategy)."""
    if recipe.precision == "fp16" and not torch.cuda.is_available():
        raise SetupError(
            "precision=fp16 needs a GPU (on a CPU Accelerate silently trains in fp32); use precision=bf16 or "
            "precision=no"
        )
    _check_launcher_precision(recipe)
    if recipe.precision == "fp64" and strategy == "deepspeed":
        raise SetupError("precision=fp64 is not supported by DeepSpeed; use precision=no (fp32) or the ddp strategy")
    # Setup (rank 0 decoding the dataset while the others wait, a first compilation) may take long; the
    # shorter distributed.timeout_s applies from the first optimizer step on (set_step_timeout).
    timeout = timedelta(seconds=max(recipe.distributed.setup_timeout_s, recipe.distributed.timeout_s))
    if not torch.cuda.is_available() and launched_world_size() > 1:
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    else:
        handlers = [InitProcessGroupKwargs(timeout=timeout)]
    extra = {}
    if strategy == "fsdp":
        _check_fsdp(recipe)
        _take_fsdp_launcher_env()
    if strategy == "deepspeed":
        extra["deepspeed_plugin"] = deepspeed_plugin(recipe, stage)
    else:
        extra["gradient_accumulation_steps"] = recipe.train.grad_accum
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    accelerator = Accelerator(
        # For DDP, `cpu=True` is what makes Accelerate treat gloo ranks as MULTI_CPU and wrap the model in DDP;
        # the gloo backend alone forms the group but leaves the model unwrapped (no gradient sync). For DeepSpeed
        # `cpu=True` would silently drop the plugin: there the gloo backend alone is right.
        # FSDP: the model is sharded by alexdist.fsdp, never wrapped by Accelerate, so `cpu=True` is harmless.
        cpu=not torch.cuda.is_available() and strategy in ("ddp", "fsdp"),
        # FSDP2 casts through its own policy (alexdist.fsdp); Accelerate's autocast stays off.
        mixed_precision="no" if strategy == "fsdp" else amp_mode(recipe.precision),
        **extra,
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
    if strategy == "deepspeed" and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise SetupError("DeepSpeed was requested but Accelerate did not enable it; launch with `accelerate launch`")
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


def dynamo_plugin(recipe: Recipe):
    """Accelerate's TorchDynamoPlugin for speed.compile (None: no compilation, whatever the launcher's env says)."""
    from accelerate.utils import TorchDynamoPlugin

    return TorchDynamoPlugin(backend="inductor" if recipe.speed.compile else "no")


def set_step_timeout(seconds: int) -> None:
    """From now on a collective that waits longer than `seconds` fails (the default group, gloo or NCCL).

    The group was created with the longer setup allowance; training steps, evaluations and saves take far
    less. On NCCL, a peer that died is only noticed this way: the watchdog aborts the collective after the
    timeout (gloo notices a closed connection at once).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # torch < 2.14
    set_timeout(timedelta(seconds=seconds))


def from_main(accelerator, value):
    """Rank 0's `value` (any picklable object) on every rank: one decision about the shared filesystem, made
    once, so that a stale directory listing on another node cannot make the ranks disagree. A collective."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def any_rank(accelerator, flags: torch.Tensor) -> list[bool]:
    """For each entry of `flags` (floats on the device, non-zero = set), whether it is set on any rank.

    One all-reduce and one host sync, the same answer on every rank: call it on all ranks, in the same order.
    """
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    return [v > 0 for v in flags.tolist()]


# How gloo and NCCL word a collective that failed because a peer died or hung (lower case). Not just "nccl":
# NCCL's own errors (invalid usage, a CUDA error inside a kernel) are bugs or broken devices, not a lost peer.
_LOST_PEER = ("connection reset", "connection closed", "closed by peer", "pair closure", "broken pipe",
              "timed out", "timeout", "remote process exited", "ncclremoteerror", "network error", "watchdog")


def lost_peer(exc: BaseException) -> bool:
    """Whether an exception is a collective failing because another process died or hung."""
    dist = torch.distributed
    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
        return True  # the rendezvous store or a connection is gone
    if not isinstance(exc, RuntimeError) or not (dist.is_available() and dist.is_initialized()):
        return False
    return any(s in str(exc).lower() for s in _LOST_PEER)


def plain_module(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without DDP's or torch.compile's wrapper (whose state dict says `_orig_mod.*`)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)
