"""One whole set of fp32 weights from a checkpoint directory, in this one process (no process group): what
`alexdist export` and `alexdist evaluate` read. Each strategy reads its own files (Strategy.consolidate): DDP's
safetensors shards, DeepSpeed's ZeRO partitions (its own `get_fp32_state_dict_from_zero_checkpoint`), FSDP2's
DCP shards (DCP reads every rank's shards into the whole model). A train.ema_is_model run's model is its EMA.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from alexdist.checkpoint.manifest import damage
from alexdist.checkpoint.state import STATE_FILE, TrainState, read_state
from alexdist.checkpoint.weights import plain_weights, weights_metadata
from alexdist.config import Recipe
from alexdist.data.dataset import CIFAR10_CLASSES
from alexdist.data.index import load_index
from alexdist.distributed.strategies import checkpoint_strategy
from alexdist.errors import CheckpointError, DataError
from alexdist.models import build_model, resolve_input_size
from alexdist.pickle_checks import check_pickles

EMA_FILE = "custom_checkpoint_0.pkl"  # Accelerate's name for the first object registered for checkpointing


def consolidate(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(fp32 state dict, metadata) from a checkpoint directory written by alexdist.train."""
    path = Path(checkpoint)
    if not (path / STATE_FILE).is_file():
        raise DataError(
            f"'{path}' is not an alexdist checkpoint (no {STATE_FILE}); pass a checkpoints/step-* directory"
        )
    if problem := damage(path):
        raise CheckpointError(f"checkpoint {path} is damaged ({problem}); export another checkpoint")
    recipe = Recipe.model_validate(yaml.safe_load((path / "config.yaml").read_text()))
    state = read_state(path)
    classes = state.classes or list(CIFAR10_CLASSES)  # checkpoints from before class names were recorded
    model = _model(recipe, len(classes))
    weights = checkpoint_strategy(path).consolidate(path, model)
    if recipe.train.ema_is_model and (path / EMA_FILE).is_file():
        weights = _with_ema(path, weights, model)
    return plain_weights(weights), weights_metadata(recipe, state.global_step, state.test_acc, classes,
                                                _normalization(path, recipe, state))


def _normalization(path: Path, recipe: Recipe, state: TrainState) -> dict | None:
    """What the run normalized with. Streamed checkpoints written before it was recorded: data.mean/std where set,
    else what the index measured (what such a run used); None (CIFAR-10's, every in-memory run's) otherwise."""
    d = recipe.data
    if state.normalization or state.data_loader != "stream" or (d.mean and d.std):
        return state.normalization
    try:
        index = load_index(d)
    except DataError as exc:
        raise CheckpointError(f"checkpoint {path} streamed its data before alexdist recorded its normalization, "
                              f"which the data's index measured: {exc}") from None
    if state.data_fingerprint and index.fingerprint != state.data_fingerprint:
        raise CheckpointError(f"checkpoint {path} streamed its data before alexdist recorded its normalization, and "
                              f"the index of '{d.source}' now describes other data than the run's; index the run's "
                              f"data again (alexdist index {d.source}) to export it")
    return {"mean": list(d.mean or index.mean), "std": list(d.std or index.std)}


def _model(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    m = recipe.model
    model = build_model(m.name, resolve_input_size(m.name, m.input_size), m.dropout, m.width_mult, num_classes)
    return model.double() if recipe.precision == "fp64" else model


def _with_ema(path: Path, weights: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's EMA parameters in place of the weights' (a train.ema_is_model run's model is its EMA)."""
    check_pickles(path)
    ema = torch.load(path / EMA_FILE, map_location="cpu", weights_only=True)
    names = [n for n, _ in model.named_parameters()]
    return {**weights, **dict(zip(names, ema["params"], strict=True))}
