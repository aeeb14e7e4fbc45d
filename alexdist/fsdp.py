"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded over the
ranks, checkpoints through `torch.distributed.checkpoint` (DCP), which reshards on load.

One code path on CPUs and GPUs: we apply `fully_shard` ourselves rather than through Accelerate's FSDP plugin,
whose set-up refuses a machine without accelerators ("There are currently no available devices found") and
so could never be tested here. Accelerate still forms the process group, counts accumulation steps and keeps
the scheduler and RNG states; the model and optimizer are not handed to it (it would wrap the model in DDP,
and its save_state writes the optimizer from rank 0 alone, while here every rank holds a different shard).

Sharding units: each conv block (the layers between two pools) and the classifier; every BatchNorm is a unit
of its own whose parameters stay fp32 under bf16 (its statistics are buffers, never cast, and `FP32BatchNorm2d`
computes in fp32), as airbench keeps BatchNorm in fp32. Under bf16 the other units gather their parameters in
bf16 and reduce gradients in fp32; the sharded master weights and the optimizer state stay fp32.

A single process without a process group (`alexdist train`, `accelerate launch --num_processes 1`) has nothing
to shard over: the model stays a plain module (autocast for bf16), and checkpoints are still DCP, so a run moves
between 1 and N processes in both directions (DCP reshards, the optimizer state included).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from alexdist.errors import CheckpointError
from alexdist.precision import HALF, keep_batchnorm_fp32

DCP_DIR = "dcp"  # inside a checkpoint: model and optimizer, one file per writing rank + .metadata


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
    """Apply FSDP2 to a model of the registry, in place (nothing on one process). Call before building the
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
    for block in conv_blocks(model.features):
        fully_shard([m for m in block if not isinstance(m, FSDPModule)], mp_policy=policy)
    fully_shard(model.classifier, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the root: casts the inputs, owns whatever is left
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Before a micro-batch's backward: reduce-scatter the gradients only on the last micro-batch of an
    optimizer step; the others accumulate unsharded gradients locally (FSDP2's `no_sync`)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a sharded parameter, gradient or norm), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: call on every rank), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (on the CPU), empty on the others. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not _grouped():
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Model and optimizer into `directory` with DCP: every rank writes its own shards. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))
    except dcp.api.CheckpointException as exc:  # raised on every rank when any rank's write failed
        raise OSError(f"DCP could not write {directory}: {str(exc).splitlines()[0][:200]}") from None


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Model and optimizer from a DCP directory written on any number of processes. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    check_dcp_metadata(directory)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory), planner=_safe_planner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def consolidate(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights from a DCP checkpoint, in this one process (no process group): DCP reads every
    rank's shards into `model`'s full tensors."""
    import torch.distributed.checkpoint as dcp

    check_dcp_metadata(directory)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, checkpoint_id=str(directory), planner=_safe_planner(), no_dist=True)
    return state["model"]


def _safe_planner():
    """DCP's load planner, unpickling the checkpoint's non-tensor items (optimizer hyperparameters, step counts)
    with `weights_only=True`: DCP's own uses `weights_only=False`, which would run code from a crafted file."""
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:  # checked first; DCP then reads the same bytes, which can only build plain data
                torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    f"a non-tensor item of the DCP checkpoint ({read_item.dest_index.fqn}) is not plain data "
                    f"({str(exc).splitlines()[0]}); not loading it (it could run code). Resume from a checkpoint "
                    f"you trust"
                ) from None
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafeLoadPlanner()


# What DCP's `.metadata` pickle holds in our checkpoints: DCP's own data classes, torch sizes and dtypes.
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _Forbidden(Exception):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _DCP_CLASSES.get(module, set())
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            allowed = {name}
        if name not in allowed:
            raise _Forbidden(f"{module}.{name}")
        return super().find_class(module, name)


def check_dcp_metadata(directory: Path) -> None:
    """Refuse a DCP `.metadata` that references anything but DCP's data classes: DCP reads it with a plain
    `pickle.load`. Read here with an unpickler that can only build those classes."""
    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as fh:
            _MetadataUnpickler(fh).load()
    except _Forbidden as exc:
        raise CheckpointError(
            f"'{path}' would import {exc} when unpickled, which no alexdist run writes; not loading it (it could "
            f"run code). Resume from a checkpoint you trust"
        ) from None
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"'{path}' is missing or unreadable ({exc}); resume from an earlier checkpoint (checkpoint.resume=PATH)"
        ) from None
