"""The data a run trains and evaluates on: decoded once per job (or per node), the validation split held out
(data.val_split), and placed on the training device (speed.data_on_device) or the host."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from alexdist import faults
from alexdist.config import Recipe
from alexdist.data.batches import TrainBatches
from alexdist.data.cache import load_dataset
from alexdist.data.dataset import Dataset, label_gap_warning
from alexdist.data.validation import stratified_split
from alexdist.errors import ConfigError
from alexdist.models import resolve_input_size


@dataclass
class RunData:
    batches: TrainBatches  # this rank's training batches
    val_x: torch.Tensor | None  # the held-out split, None without data.val_split
    val_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    val_fingerprint: str | None  # the held-out indices' hash (checkpoints record it)


def run_data(recipe: Recipe, accelerator) -> RunData:
    """This rank's training batches, the validation split, the test set and the class names."""
    t = recipe.train
    ds = _load_once(recipe, accelerator)
    if accelerator.is_main_process and (gaps := label_gap_warning(ds)):
        print(f"alexdist: warning: {gaps}", file=sys.stderr, flush=True)
    train_x, train_y, val_x, val_y, fingerprint = ds.train_x, ds.train_y, None, None, None
    if recipe.data.val_split is not None:
        split = stratified_split(ds.train_y, recipe.data.val_split, ds.classes)
        train_x, train_y = ds.train_x[split.train_idx], ds.train_y[split.train_idx]
        val_x, val_y, fingerprint = ds.train_x[split.val_idx], ds.train_y[split.val_idx], split.fingerprint
    place = accelerator.device if recipe.speed.data_on_device else torch.device("cpu")
    batches = TrainBatches(
        train_x.to(place), train_y.to(place), t.batch_size, t.grad_accum, accelerator.process_index,
        accelerator.num_processes, t.seed, recipe.augment,
        resolve_input_size(recipe.model.name, recipe.model.input_size),
    )
    if batches.steps_per_epoch == 0:
        raise ConfigError(
            f"the effective batch ({batches.effective_batch} = train.batch_size {t.batch_size} x "
            f"{accelerator.num_processes} processes x train.grad_accum {t.grad_accum}) is larger than the "
            f"{len(train_y)} training images; lower train.batch_size or train.grad_accum"
        )
    return RunData(batches, None if val_x is None else val_x.to(place), None if val_y is None else val_y.to(place),
                   ds.test_x.to(place), ds.test_y.to(place), ds.classes, fingerprint)


def _load_once(recipe: Recipe, accelerator) -> Dataset:
    """The dataset, decoded once per job when the cache is shared (rank 0 writes it, everyone else reads it) and
    once per node when data.cache_dir is node-local (each node's first process finds no cache and writes its own;
    the node's other processes then read it)."""
    ds = None
    if accelerator.is_main_process:
        faults.slow_setup_point()
        ds = load_dataset(recipe.data)
    accelerator.wait_for_everyone()
    with accelerator.local_main_process_first():
        if not accelerator.is_main_process:
            faults.slow_setup_point()
            ds = load_dataset(recipe.data)
    return ds
