"""FSDP2's checkpoint backend: model and optimizer shards through `torch.distributed.checkpoint` (DCP), which
reshards on load (any world size, optimizer state included), and the one-process consolidation `alexdist export`
uses. DCP unpickles its metadata and non-tensor items with `pickle.load` / `weights_only=False`: both are
checked here first by unpicklers that can only build plain data and DCP's own classes.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from alexdist.errors import CheckpointError

DCP_DIR = "dcp"  # inside a checkpoint: model and optimizer, one file per writing rank + .metadata


def save(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Model and optimizer into `directory` with DCP: every rank writes its own shards. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))
    except dcp.api.CheckpointException as exc:  # raised on every rank when any rank's write failed
        raise OSError(f"DCP could not write {directory}: {str(exc).splitlines()[0][:200]}") from None


def load(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
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
