"""FSDP2 (`torch.distributed.fsdp.fully_shard`): what differs from DDP. Parameters, gradients and optimizer
state are sharded over the ranks, and checkpoints go through `torch.distributed.checkpoint` (DCP, in
distributed/dcp.py), which reshards on load.

- Sharded before the optimizer exists (sharding replaces the parameters); the optimizer uses foreach kernels
  (the fused ones have no DTensor rule); Accelerate prepares only the scheduler.
- Accumulation: gradients are reduce-scattered on the last micro-batch only (`set_requires_gradient_sync`).
- Every forward gathers parameters (a collective): every rank runs the same number of evaluation forwards.
- FSDP never syncs buffers: rank 0's BatchNorm statistics are broadcast before every evaluation and every
  checkpoint (DCP writes a replicated tensor from whichever rank its planner picks).
- channels_last: FSDP2 refuses non-contiguous parameters, so only the inputs are channels_last (a convolution
  with a channels_last input runs channels_last: PyTorch picks the layout from either operand).
- Refused: fp16 (it would need a sharded gradient scaler), speed.compile, ZeRO-Offload, an EMA.

One code path on CPUs and GPUs: we apply `fully_shard` ourselves rather than through Accelerate's FSDP plugin,
whose set-up refuses a machine without accelerators ("There are currently no available devices found") and
so could never be tested here. Accelerate still forms the process group, counts accumulation steps and keeps
the scheduler and RNG states; the model and optimizer are not handed to it (it would wrap the model in DDP,
and its save_state writes the optimizer from rank 0 alone, while here every rank holds a different shard).

Sharding units: for the registry's models each conv block (the layers between two pools) and the classifier;
for a model of your own (model.name by import path) every child module of at least UNIT_PARAMS parameters,
recursively (sharding_units); every BatchNorm is a unit of its own whose parameters stay fp32 under bf16 (its
statistics are buffers, never cast, and `FP32BatchNorm2d` computes in fp32), as airbench keeps BatchNorm in fp32.
Under bf16 the other units gather their parameters in bf16 and reduce gradients in fp32; the sharded master
weights and the optimizer state stay fp32.

A single process without a process group (`alexdist train`, `accelerate launch --num_processes 1`) has nothing
to shard over: the model stays a plain module (autocast for bf16), and checkpoints are still DCP, so a run moves
between 1 and N processes in both directions (DCP reshards, the optimizer state included).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from alexdist.config import Recipe
from alexdist.distributed import dcp
from alexdist.distributed.collectives import broadcast_buffers
from alexdist.distributed.strategy import HALF, Strategy
from alexdist.errors import SetupError
from alexdist.models import keep_batchnorm_fp32


class FSDP2Strategy(Strategy):
    name = "fsdp"
    sharded_forward = True
    whole_weights = False

    def refuse_unsupported(self, recipe: Recipe) -> None:
        if recipe.model.sync_bn:  # not run under FSDP2 on a GPU yet: refused rather than promised
            raise SetupError("model.sync_bn is supported with the ddp strategy only (untested under FSDP2); drop "
                             "model.sync_bn or use distributed.strategy=ddp")
        if recipe.precision == "fp16":
            raise SetupError("precision=fp16 is not supported with distributed.strategy=fsdp (FSDP2 would need a "
                             "sharded gradient scaler); use precision=bf16, or fp16 with the ddp or deepspeed strategy")
        if recipe.speed.compile:
            raise SetupError("speed.compile is not supported with distributed.strategy=fsdp yet; set "
                             "speed.compile=false or use the ddp strategy")
        if recipe.distributed.deepspeed.offload_optimizer:
            raise SetupError("distributed.deepspeed.offload_optimizer is a DeepSpeed (ZeRO-Offload) option; drop it "
                             "with distributed.strategy=fsdp, or use distributed.strategy=deepspeed")

    def accelerator_kwargs(self, recipe: Recipe) -> dict:
        # FSDP2 is applied here; left in the environment, the launcher's FSDP settings would make Accelerate build
        # its own FSDP plugin (which refuses CPU-only machines) and clip through it.
        for key in [k for k in os.environ if k.startswith(("FSDP_", "ACCELERATE_FSDP_"))] + ["ACCELERATE_USE_FSDP"]:
            os.environ.pop(key, None)
        # The model is sharded here, never wrapped by Accelerate (`cpu=True` is harmless); FSDP2 casts through
        # its own policy, so Accelerate's autocast stays off.
        return {"cpu": not torch.cuda.is_available(), "mixed_precision": "no",
                "gradient_accumulation_steps": recipe.train.grad_accum}

    def shard(self, model: nn.Module, recipe: Recipe) -> nn.Module:
        return shard_model(model, recipe.precision)  # no channels_last parameters: see the module's docstring

    def prepare(self, accelerator, model, optimizer, scheduler, recipe: Recipe):
        # Accelerate would wrap the model in DDP and save the optimizer from rank 0 alone.
        return model, optimizer, accelerator.prepare(scheduler)

    def set_gradient_sync(self, model, sync: bool) -> None:
        if hasattr(model, "set_requires_gradient_sync"):  # reduce-scatter on the last micro-batch only
            model.set_requires_gradient_sync(sync)

    def gradient_probe(self, accelerator, model, recipe: Recipe) -> str:
        return "FSDP2 reduce-scatters each rank's gradients inside its engine, where they cannot be read before"

    def final_weights(self, accelerator, model, precision: str) -> dict[str, torch.Tensor]:
        return full_state_dict(model)

    def ema_refusal(self, precision: str) -> str | None:
        return "FSDP, whose ranks hold shards of the weights; use DDP or ZeRO-1/2"

    def before_save(self, accelerator, model) -> None:
        # The statistics saved must be rank 0's, as DDP saves and evaluation uses; the other ranks' running
        # statistics are never used before the next such broadcast.
        broadcast_buffers(accelerator, model)

    def save_sharded(self, accelerator, model, optimizer, directory: Path) -> bool:
        dcp.save(model, optimizer, directory / dcp.DCP_DIR)
        return True

    def load_checkpoint(self, accelerator, model, optimizer, path: Path, saved_world: int) -> None:
        accelerator.load_state(str(path))  # the scheduler and RNG states; DCP reshards the rest
        dcp.load(model, optimizer, path / dcp.DCP_DIR)

    @classmethod
    def owns_checkpoint(cls, path: Path) -> bool:
        return (path / dcp.DCP_DIR).is_dir()

    @classmethod
    def consolidate(cls, path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
        return dcp.consolidate(path / dcp.DCP_DIR, model)


def _grouped() -> bool:
    """Whether a process group exists: FSDP2 shards over it (a group of 1, e.g. `torchrun --nproc_per_node 1`,
    runs the real FSDP2 path with whole shards; Accelerate's single-process mode has no group)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def conv_blocks(features: nn.Sequential) -> list[list[nn.Module]]:
    """The layers of `features` grouped into blocks that end at each pooling layer."""
    blocks: list[list[nn.Module]] = [[]]
    for layer in features:
        blocks[-1].append(layer)
        if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            blocks.append([])
    return [b for b in blocks if any(True for _ in nn.ModuleList(b).parameters())]


def shard_model(model: nn.Module, precision: str) -> nn.Module:
    """Apply FSDP2 to a model, in place (nothing on one process). Call before building the
    optimizer: sharding replaces the parameters with DTensors."""
    half = HALF.get(precision)
    if not _grouped():
        if half:  # nothing to shard over, no FSDP policy to cast: mixed precision as under DDP (autocast)
            device = next(model.parameters()).device.type
            model.forward = torch.autocast(device, dtype=half)(model.forward)
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32 if half else None)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if half:
        keep_batchnorm_fp32(model)  # computes in fp32 and returns the input's dtype to the next (bf16) conv
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                fully_shard(m, mp_policy=fp32)
    if hasattr(model, "features") and hasattr(model, "classifier"):  # the registry's models
        for block in conv_blocks(model.features):
            fully_shard([m for m in block if not isinstance(m, FSDPModule)], mp_policy=policy)
        fully_shard(model.classifier, mp_policy=policy)
    else:
        for unit in sharding_units(model):
            fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the root: casts the inputs, owns whatever is left
    return model


UNIT_PARAMS = 100_000  # a model of your own: modules at least this big are sharded as units of their own


def sharding_units(module: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards a model of your own by, knowing nothing of it: every child module with at least
    UNIT_PARAMS parameters, or, where such a child has children that big, those instead (recursively); what is
    left (small layers) belongs to the root. A parameter shared by two units cannot be sharded twice: refused."""
    from torch.distributed.fsdp import FSDPModule

    units: list[nn.Module] = []
    for child in module.children():
        if isinstance(child, FSDPModule) or _params(child) < UNIT_PARAMS:
            continue
        inner = [c for c in child.children() if _params(c) >= UNIT_PARAMS]
        units += sharding_units(child) if inner else [child]
    seen: set[int] = set()
    for unit in units:
        mine = {id(p) for p in unit.parameters()}
        if mine & seen:
            raise SetupError(f"model.name: a parameter of {type(unit).__name__} is shared with another part of the "
                             f"model (tied weights), which FSDP2 cannot shard as separate units; use the ddp strategy")
        seen |= mine
    return units


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (on the CPU), empty on the others. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not _grouped():
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


