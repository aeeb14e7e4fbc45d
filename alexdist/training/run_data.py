"""The data a run trains and evaluates on, from one of two paths (docs/data.md): in memory (decoded once per job
or per node, placed on the training device or the host: speed.data_on_device) or streamed from disk behind an
index (read and decoded by loader workers). The path is chosen once, on rank 0, and every rank takes it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from alexdist import faults
from alexdist.checkpoint.state import TrainState, complete_checkpoints, read_state
from alexdist.config import Recipe
from alexdist.data.batches import CIFAR_MEAN, CIFAR_STD, MemoryEvalSet, TrainBatches, source_bytes
from alexdist.data.cache import load_dataset
from alexdist.data.choice import choose_loader
from alexdist.data.dataset import Dataset, available_memory, label_gap_warning
from alexdist.data.interface import Batches
from alexdist.data.validation import stratified_split
from alexdist.distributed.accelerator import local_processes
from alexdist.distributed.collectives import every_rank, from_main
from alexdist.errors import AlexdistError, ConfigError, SetupError
from alexdist.models import resolve_input_size
from alexdist.training.run_inputs import RunData


def run_data(recipe: Recipe, accelerator) -> RunData:
    """This rank's training batches, the validation split, the test set and the class names."""
    loader, why, resumed_norm = _choose(recipe, accelerator)
    if loader == "stream":
        from alexdist.training.run_data_streamed import streamed_run_data

        data = streamed_run_data(recipe, accelerator, resumed_norm)
    else:
        data = _memory_run_data(recipe, accelerator)
    data.loader = loader
    if accelerator.is_main_process and why:
        print(f"alexdist: data: {why}", file=sys.stderr, flush=True)
    _check_steps(data.batches, recipe, accelerator, data.train_images)
    return data


def _choose(recipe: Recipe, accelerator) -> tuple[str, str | None, dict | None]:
    """The data path, chosen on rank 0 and handed to every rank (a collective), a refusal too: raised on rank 0
    alone, it would leave the other ranks waiting in the broadcast. With it the normalization the checkpoint this
    run resumes recorded (None for a fresh start or an older checkpoint)."""
    choice = None
    if accelerator.is_main_process:
        try:
            state = resumed_state(recipe)
            loader = state.data_loader if state else None
            choice = (*choose_loader(recipe.data, recipe.augment, local_processes(), loader),
                      state.normalization if state else None)
        except AlexdistError as exc:
            choice = exc
    choice = from_main(accelerator, choice)
    if isinstance(choice, AlexdistError):
        raise choice
    return choice


def resumed_state(recipe: Recipe) -> TrainState | None:
    """The state of the checkpoint this run would continue, None for a fresh start: data.loader=auto follows its
    data path (memory | stream), a streamed run its normalization. The newest readable one: the resume moves a
    damaged one aside, and every checkpoint of one output_dir took the same path (a resume that would switch is
    refused) and the same normalization (this one)."""
    r = recipe.checkpoint.resume
    if r == "never":
        return None
    for path in reversed(complete_checkpoints(recipe.output_dir)) if r == "auto" else [Path(r)]:
        try:
            return read_state(path)
        except (OSError, ValueError, TypeError):  # unreadable: the resume says so, or takes the one before
            continue
    return None


def _memory_run_data(recipe: Recipe, accelerator) -> RunData:
    t = recipe.train
    ds = _load_once(recipe, accelerator)
    if accelerator.is_main_process and (gaps := label_gap_warning(ds.train_y, ds.classes)):
        print(f"alexdist: warning: {gaps}", file=sys.stderr, flush=True)
    train_x, train_y, val_x, val_y, fingerprint = ds.train_x, ds.train_y, None, None, None
    if recipe.data.val_split is not None:
        split = stratified_split(ds.train_y, recipe.data.val_split, ds.classes)
        train_x, train_y = ds.train_x[split.train_idx], ds.train_y[split.train_idx]
        val_x, val_y, fingerprint = ds.train_x[split.val_idx], ds.train_y[split.val_idx], split.fingerprint
    place = accelerator.device if recipe.speed.data_on_device else torch.device("cpu")
    n_eval = len(ds.test_y) + (0 if val_y is None else len(val_y))
    check_memory(recipe, accelerator, place, len(train_y), n_eval, ds.train_x.shape[-1])
    mean, std = recipe.data.mean or CIFAR_MEAN, recipe.data.std or CIFAR_STD
    input_size = resolve_input_size(recipe.model.name, recipe.model.input_size)
    batches = TrainBatches(train_x, train_y, t.batch_size, t.grad_accum, accelerator.process_index,
                           accelerator.num_processes, t.seed, recipe.augment, input_size, device=place, mean=mean,
                           std=std)
    val = None if val_x is None else MemoryEvalSet(val_x.to(place), val_y.to(place), input_size, mean, std)
    test = MemoryEvalSet(ds.test_x.to(place), ds.test_y.to(place), input_size, mean, std)
    return RunData(batches, val, test, ds.classes, fingerprint, len(train_y), mean=mean, std=std)


def _check_steps(batches: Batches, recipe: Recipe, accelerator, n_train: int) -> None:
    if batches.steps_per_epoch == 0:
        t = recipe.train
        raise ConfigError(
            f"the effective batch ({batches.effective_batch} = train.batch_size {t.batch_size} x "
            f"{accelerator.num_processes} processes x train.grad_accum {t.grad_accum}) is larger than the "
            f"{n_train} training images; lower train.batch_size or train.grad_accum"
        )


def check_memory(recipe: Recipe, accelerator, place: torch.device, n_train: int, n_eval: int, size: int) -> None:
    """Refuse, in one line with the figures, training data that would not fit where it is placed: the padded (and
    mirrored) training images plus the evaluation images, in the GPU's free memory (speed.data_on_device), or in
    host memory for every process on a node (each keeps its own). Decided on every rank alike, on the tightest
    rank's figures (a collective): free memory differs between GPUs and nodes, and a rank that refused alone would
    leave the others waiting in their next collective."""
    a = recipe.augment
    need = source_bytes(n_train, size, a.crop_padding, a.flip) + n_eval * 3 * size * size
    what = (f"the training and evaluation images at data.image_size={size} ({n_train:,} training images kept "
            f"zero-padded{' and mirrored' if a.flip else ''}, {n_eval:,} evaluation images)")
    gpu = place.type == "cuda"
    here = [torch.cuda.mem_get_info(place)[0], 1] if gpu else [available_memory(), local_processes()]
    # The rank with the least memory per process: it refuses if any rank does.
    rank, (have, processes) = min(enumerate(every_rank(accelerator, here)), key=lambda r: r[1][0] / r[1][1])
    processes, gib = int(processes), 2**30
    if processes * need <= 0.9 * have:
        return
    alone = accelerator.num_processes == 1
    if gpu:
        where = str(place) if alone else f"rank {rank}'s GPU"
        raise SetupError(f"{what} take {need / gib:.1f} GiB of GPU memory, more than the {have / gib:.1f} GiB free "
                         f"on {where}; set speed.data_on_device=false (batches built on the host), lower "
                         f"data.image_size (model.input_size upsamples on the GPU), or use a larger GPU")
    where = "this node" if alone else f"rank {rank}'s node"
    raise SetupError(f"{what} take {need / gib:.1f} GiB of host memory per process, {processes * need / gib:.1f} GiB "
                     f"for the {processes} on {where}, more than the {have / gib:.1f} GiB available; stream it "
                     f"from disk (data.loader=stream), lower data.image_size or run fewer processes per node")


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
