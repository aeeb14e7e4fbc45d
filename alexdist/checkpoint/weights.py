"""The weights file: one safetensors file (no pickle) holding the model's own parameter names, with metadata
that names the model, its input size and width, the data it was trained on and the step, so `evaluate`,
`build_model` and anyone else can rebuild it. `train` writes it at the end of a run, `export` from a checkpoint,
`evaluate` reads either.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alexdist.config import Recipe
from alexdist.errors import DataError
from alexdist.fileio import atomic_path
from alexdist.models import resolve_input_size


def weights_metadata(recipe: Recipe, step: int, test_acc: float | None, classes: list[str]) -> dict[str, str]:
    """The metadata header (safetensors metadata values are strings)."""
    return {
        "model": recipe.model.name,
        "input_size": str(resolve_input_size(recipe.model.name, recipe.model.input_size)),
        "width_mult": str(recipe.model.width_mult),
        "dropout": str(recipe.model.dropout),
        "data_source": recipe.data.source,
        "data": json.dumps(recipe.data.model_dump(exclude={"cache_dir"})),
        "classes": json.dumps(classes),
        "step": str(step),
        "test_acc": "" if test_acc is None else repr(test_acc),
    }


def plain_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 tensors (fp64 kept: precision=fp64) under the model's own names: a compiled model's state dict
    says `_orig_mod.*`, and 16-bit copies would lose what the fp32 master weights hold."""
    return {
        k.removeprefix("_orig_mod."): v.detach().to(torch.float64 if v.dtype == torch.float64 else torch.float32)
        .contiguous()
        for k, v in state_dict.items()
    }


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write the weights file atomically (a reader never sees half a file)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(plain_weights(state_dict), str(tmp), metadata=meta)
    return path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a weights file; DataError with the fix for a missing or unreadable one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except FileNotFoundError:
        raise DataError(f"'{path}' does not exist") from None
    except Exception as exc:  # safetensors raises its own error types: all mean "unreadable"
        raise DataError(f"'{path}' is not a readable safetensors file ({exc}); export it again") from None
    if "model" not in meta:
        raise DataError(f"'{path}' has no 'model' metadata; export it with `alexdist export`")
    return weights, meta


def classes_of(meta: dict[str, str]) -> list[str]:
    """The class names a weights file was trained on (files written before names were recorded: CIFAR-10's)."""
    from alexdist.data.dataset import CIFAR10_CLASSES

    return json.loads(meta["classes"]) if meta.get("classes") else list(CIFAR10_CLASSES)


def model_for(meta: dict[str, str], weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The model a weights file's metadata describes (head sized by its classes), with `weights` if given, in
    eval mode."""
    from alexdist.models import build_model

    model = build_model(meta["model"], int(meta["input_size"]), 0.0, float(meta.get("width_mult", "1.0")),
                        num_classes=len(classes_of(meta)))
    if weights is not None:
        model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model.eval()
