"""DeepSpeed ZeRO-1/2/3 through Accelerate: what differs from DDP.

- The engine owns the optimizer step: it runs inside backward on the last micro-batch, clips the gradients
  itself (train.grad_clip goes into its config), and skips a step whose global gradient norm overflowed (its
  flag is read by the divergence guard). Under fp16 its own loss scaler gives up at
  distributed.deepspeed.fp16_min_loss_scale by raising a plain Exception from backward, which becomes the
  divergence stop.
- fp16/bf16: the engine casts the module's parameters to 16 bit and runs no autocast: inputs are cast by hand,
  BatchNorm computes in fp32, and the final weights are the fp32 masters, not the 16-bit copies.
- Buffers: ZeRO broadcasts none. Rank 0's BatchNorm statistics are broadcast, coalesced, where they are read:
  before every evaluation and every checkpoint, so every rank and every checkpoint holds rank 0's, and a resumed
  rank 1 continues from what the uninterrupted rank 1 had (rank 0's, since the save). Training never reads them.
- ZeRO-3: parameters are partitioned, every forward gathers them (a collective); no EMA, no rank checksums.
- Checkpoints: DeepSpeed's partitioned files under `pytorch_model/`. On another world size, ZeRO-1/2 go through
  DeepSpeed's universal checkpoint (distributed/zero_universal.py); ZeRO-3 is refused with the way out.
- Refused: precision=fp64 (DeepSpeed has none) and LARS (its optimizer would see ZeRO's flat partitions).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

from alexdist.config import Recipe
from alexdist.distributed.collectives import broadcast_buffers, plain_module
from alexdist.distributed.strategy import HALF, Strategy
from alexdist.distributed.zero_universal import DS_TAG
from alexdist.errors import AlexdistError, SetupError, require_extra

# The words of DeepSpeed's DynamicLossScaler when the scale is at its minimum and the step still overflows
# (deepspeed/runtime/fp16/loss_scaler.py raises a plain Exception inside backward).
DEEPSPEED_MIN_SCALE = "loss scale already at minimum"


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    engine_steps = True
    clips_itself = True
    master_copies = 1

    def __init__(self, zero_stage: int = 2):
        self.zero_stage = zero_stage

    @property
    def sharded_forward(self) -> bool:
        return self.zero_stage == 3

    @property
    def whole_weights(self) -> bool:
        return self.zero_stage != 3

    def describe(self) -> str:
        return f"deepspeed ZeRO-{self.zero_stage}"

    def refuse_unsupported(self, recipe: Recipe) -> None:
        if recipe.model.sync_bn:  # not run under DeepSpeed on a GPU yet: refused rather than promised
            raise SetupError("model.sync_bn is supported with the ddp strategy only (untested under DeepSpeed); drop "
                             "model.sync_bn or use distributed.strategy=ddp")
        if recipe.precision == "fp64":
            raise SetupError("precision=fp64 is not supported by DeepSpeed; use precision=no (fp32) or the ddp "
                             "strategy")
        if recipe.optim.name == "lars":
            # ZeRO hands the optimizer one flat partition per parameter group: LARS's per-layer norms would be
            # norms of arbitrary slices of the model.
            raise SetupError("optim.name=lars is not supported by DeepSpeed, whose ZeRO optimizer sees flat "
                             "partitions, not layers; use the ddp or fsdp strategy, or SGD with an SGD lr (for the "
                             "bn recipe: optim.name=sgd optim.lr=0.1 optim.lr_scaling=none)")

    def accelerator_kwargs(self, recipe: Recipe) -> dict:
        from alexdist.distributed.accelerator import amp_mode

        # `cpu=True` would silently drop the plugin: the gloo backend alone is right here.
        return {"cpu": False, "mixed_precision": amp_mode(recipe.precision),
                "deepspeed_plugin": deepspeed_plugin(recipe, self.zero_stage)}

    def confirm_accelerator(self, accelerator) -> None:
        from accelerate.utils import DistributedType

        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            raise SetupError("DeepSpeed was requested but Accelerate did not enable it; launch with `accelerate "
                             "launch`")

    def compute_dtype(self, precision: str) -> torch.dtype:
        return HALF.get(precision, torch.float32)

    def fp32_batchnorm(self, precision: str, requested: bool) -> bool:
        return precision in HALF  # the engine casts BatchNorm's weights, not its statistics: mixed dtypes

    def prepare(self, accelerator, model, optimizer, scheduler, recipe: Recipe):
        from alexdist.models import restore_fp32_buffers

        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        if recipe.precision in HALF:
            restore_fp32_buffers(model)
        return model, optimizer, scheduler

    def before_save(self, accelerator, model) -> None:
        # ZeRO broadcasts no buffers: each rank's running statistics follow its own batches. A checkpoint holds
        # rank 0's (its module states), so every rank takes rank 0's before a save, and a resumed rank 1 goes on
        # from exactly what an uninterrupted rank 1 has (evaluations broadcast them too).
        broadcast_buffers(accelerator, model)

    def gradient_probe(self, accelerator, model, recipe: Recipe) -> str:
        return "DeepSpeed reduces each rank's gradients inside its engine, where they cannot be read before"

    def engine_skipped(self, optimizer) -> bool | None:
        return bool(optimizer.step_was_skipped)  # the engine's overflow flag, set in backward

    def backward_failure(self, exc: BaseException) -> str | None:
        if DEEPSPEED_MIN_SCALE in str(exc):  # raised on every rank
            return ("DeepSpeed's fp16 loss scale is at distributed.deepspeed.fp16_min_loss_scale and the step still "
                    "overflowed")
        return None

    def final_weights(self, accelerator, model, precision: str) -> dict[str, torch.Tensor]:
        if precision not in HALF:
            return accelerator.get_state_dict(model)
        from deepspeed.utils import safe_get_full_fp32_param

        module = plain_module(accelerator, model)
        params = dict(module.named_parameters())
        return {name: safe_get_full_fp32_param(params[name]) if name in params else value
                for name, value in module.state_dict().items()}  # the same order on every rank

    def ema_refusal(self, precision: str) -> str | None:
        if self.zero_stage == 3:
            return "ZeRO-3, whose ranks hold shards of the weights; use DDP or ZeRO-1/2"
        if precision in HALF:
            # The engine's module holds 16-bit copies; the fp32 masters are partitioned across ranks, and
            # gathering them every step would cost ZeRO-3's traffic.
            return (f"DeepSpeed and precision={precision} (it would average the 16-bit copies, not the fp32 master "
                    f"weights); use precision=no or the ddp strategy")
        return None

    def resume_refusal(self, path: Path, saved_world: int, world: int) -> AlexdistError | None:
        from alexdist.distributed.zero_universal import refusal

        return refusal(path, saved_world, world, self.zero_stage) if saved_world != world else None

    def load_checkpoint(self, accelerator, model, optimizer, path: Path, saved_world: int) -> None:
        if saved_world == accelerator.num_processes:
            accelerator.load_state(str(path))
        else:
            from alexdist.distributed.zero_universal import load_on_this_world_size

            load_on_this_world_size(accelerator, model, path)
        # ZeRO-1/2 take the checkpoint's clipping threshold over their config's: the recipe's (train.grad_clip,
        # in the engine's config) is the run's, also when a resume changed it.
        if hasattr(model.optimizer, "clip_grad"):
            model.optimizer.clip_grad = float(model.gradient_clipping() or 0.0)

    @classmethod
    def owns_checkpoint(cls, path: Path) -> bool:
        return (path / DS_TAG).is_dir()

    @classmethod
    def consolidate(cls, path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        require_extra("deepspeed", "reading a DeepSpeed ZeRO checkpoint", "deepspeed")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from alexdist.pickle_checks import check_pickles

        check_pickles(path / DS_TAG)  # DeepSpeed unpickles with weights_only=False
        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)


def deepspeed_plugin(recipe: Recipe, stage: int):
    """A DeepSpeedPlugin from an explicit DeepSpeed config, so every setting is visible here."""
    from accelerate.utils import DeepSpeedPlugin

    if importlib.util.find_spec("deepspeed") is None:
        raise SetupError("distributed.strategy=deepspeed needs DeepSpeed: pip install 'alexdist[deepspeed]'")
    environment_tools_first()
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
            "offload_optimizer": {"device": "cpu" if d.deepspeed.offload_optimizer else "none"},
            "stage3_gather_16bit_weights_on_model_save": True,  # get_state_dict() gathers full weights
        },
        "zero_allow_untested_optimizer": True,  # our SGD is a plain torch optimizer
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {
            "enabled": recipe.precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": d.deepspeed.fp16_initial_scale_power,
            "loss_scale_window": d.deepspeed.fp16_loss_scale_window,
            "hysteresis": d.deepspeed.fp16_hysteresis,
            "min_loss_scale": d.deepspeed.fp16_min_loss_scale,  # an int: DeepSpeed validates it as one
        },
        "bf16": {"enabled": recipe.precision == "bf16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return DeepSpeedPlugin(hf_ds_config=config)


def environment_tools_first(tool: str = "ninja") -> None:
    """Put this virtual environment's bin folder first on PATH, as activating it does, if it holds `tool`.

    DeepSpeed JIT-builds its CPU communication op at its first init, with whichever `ninja` PATH finds: pip
    installs one into the environment (1.13), the system may have another (Debian's 1.11). The two hash a
    build's command differently, so each rebuilds what the other built: a job launched without the environment
    on PATH (`.venv/bin/accelerate ...`) beside one launched with it (a Slurm job that activates it) rebuilds
    the op at every launch, and every rank of both jobs waits on the build's lock meanwhile. Measured on one AMD
    EPYC machine with both cores busy: 175-195 s for each rebuild against 0.2 s to load the built op, enough to
    push a ZeRO launch past its timeout. With the same ninja everywhere the op is built once per environment.

    Nothing changes outside a virtual environment (a system Python's folder, /usr/bin, would go before a
    cluster's module-loaded compilers) or in one without its own `tool`. The folder comes from sys.prefix, not
    sys.executable, which may be empty (its parent would be the working directory).
    """
    if sys.prefix == sys.base_prefix:
        return
    bindir = Path(sys.prefix, "Scripts" if os.name == "nt" else "bin")
    if not bindir.is_absolute() or shutil.which(tool, path=str(bindir)) is None:
        return
    # An unset PATH means the default search path; empty entries (the working directory) are dropped.
    rest = os.environ.get("PATH", os.defpath).split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([str(bindir), *(p for p in rest if p and p != str(bindir))])
