"""The weights file: one safetensors file (no pickle) holding the model's own parameter names, with metadata
that names the model, its input size and width, the data it was trained on, the input pipeline its evaluation
used (Pipeline) and the step, so `evaluate`, `predict`, the ONNX export, the Hub card and anyone else can rebuild
and feed it. `train` writes it at the end of a run, `export` from a checkpoint, `evaluate` reads either.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alexdist.config import Recipe
from alexdist.data.batches import CIFAR_MEAN, CIFAR_STD, Stats
from alexdist.data.crops import eval_resize_of
from alexdist.errors import DataError
from alexdist.fileio import atomic_path
from alexdist.models import resolve_input_size


@dataclass(frozen=True)
class Pipeline:
    """How an image file becomes the model's input, as the run's evaluation did it: decoded to RGB; the shorter
    side resized to `eval_resize` and the centre image_size x image_size crop kept (eval_resize None: the whole
    image resized to image_size x image_size); pixels / 255, then (x - mean) / std per channel; then resized
    (bilinear) to input_size where that differs (data.decode.decode_eval, then data.batches.normalize)."""

    image_size: int
    eval_resize: int | None
    input_size: int
    mean: Stats
    std: Stats


def run_pipeline(recipe: Recipe, normalization: dict | None = None) -> Pipeline:
    """A run's pipeline; `normalization` ({"mean", "std"}) is what the run used (measured on the data when streamed
    without data.mean/std), None for weights made outside a run: the recipe's, else CIFAR-10's."""
    d = recipe.data
    norm = normalization or {"mean": d.mean or CIFAR_MEAN, "std": d.std or CIFAR_STD}
    return Pipeline(d.image_size, eval_resize_of(d.image_size, d.eval_resize, recipe.augment.random_resized_crop),
                    resolve_input_size(recipe.model.name, recipe.model.input_size),
                    tuple(norm["mean"]), tuple(norm["std"]))


def pipeline_of(meta: dict[str, str]) -> Pipeline:
    """The pipeline a weights file records; files written before it was recorded: the data settings they carry,
    else CIFAR-10's constants and a plain resize to 32 px (what every in-memory run used). A file of theirs from a
    run that may have streamed (a local folder under data.loader auto or stream) is refused: its normalization
    and crops were the index's and the augmentation's, which the file does not say."""
    if meta.get("pipeline"):
        p = json.loads(meta["pipeline"])
        return Pipeline(p["image_size"], p["eval_resize"], p["input_size"], tuple(p["mean"]), tuple(p["std"]))
    data = json.loads(meta["data"]) if meta.get("data") else {}
    if _may_have_streamed(data):
        raise DataError(f"this weights file predates the recorded input pipeline and its run may have streamed "
                        f"data.source={data.get('source')} (data.loader={data['loader']}), so its resize and "
                        f"normalization are unknown; export it again from the run's checkpoint: alexdist export "
                        f"RUN/checkpoints/step-N OUT.safetensors")
    return Pipeline(data.get("image_size") or 32, data.get("eval_resize"), int(meta["input_size"]),
                    tuple(data.get("mean") or CIFAR_MEAN), tuple(data.get("std") or CIFAR_STD))


def _may_have_streamed(data: dict) -> bool:
    """Whether a run's data settings (recorded since data.loader exists) allow the streamed path: a local folder
    not forced into memory; the built-in sets and Hub ids are read in memory only (data.choice)."""
    source = str(data.get("source") or "")
    if data.get("loader", "memory") == "memory" or source in ("synthetic", "digits", "mnist"):
        return False
    if Path(source).expanduser().is_dir():  # here: whether its layout can stream at all (CIFAR's batches cannot)
        from alexdist.data.index import indexable

        return indexable(source)
    # Not here (evaluated elsewhere): a Hub id's shape read in memory; any other path may have streamed.
    return not (source.count("/") == 1 and not source.startswith((".", "/", "~")))


def weights_metadata(recipe: Recipe, step: int, test_acc: float | None, classes: list[str],
                     normalization: dict | None = None) -> dict[str, str]:
    """The metadata header (safetensors metadata values are strings); `normalization` as in run_pipeline."""
    pipeline = run_pipeline(recipe, normalization)
    return {
        "model": recipe.model.name,
        "input_size": str(pipeline.input_size),
        "pipeline": json.dumps(asdict(pipeline)),
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
