"""The streamed path's run data (data.loader=stream, or auto for a set larger than memory): the index built once
(by rank 0, when missing; `alexdist index` builds it ahead of a job) and read by every rank, the validation split
held out of its training entries, and loader workers per rank."""

from __future__ import annotations

import socket
import sys

import numpy as np
import torch

from alexdist.config import Recipe
from alexdist.data.choice import default_workers
from alexdist.data.crops import eval_resize_of
from alexdist.data.dataset import label_gap_warning
from alexdist.data.index import DataIndex, build_index, cache_root, index_file, load_index
from alexdist.data.streamed import StreamBatches, StreamEvalSet
from alexdist.data.validation import stratified_split
from alexdist.distributed.accelerator import local_processes
from alexdist.distributed.collectives import first_failure, from_main
from alexdist.errors import AlexdistError, DataError, SetupError, brief
from alexdist.models import resolve_input_size
from alexdist.training.run_inputs import RunData


def _index_once(recipe: Recipe, accelerator) -> DataIndex:
    """The source's index: built by rank 0 if missing (under data.cache_dir, which every node must see) and
    loaded there; every other rank loads the generation rank 0 loaded, not whatever index.json names by then (a
    rebuild meanwhile would give ranks different data). A failure is raised on every rank alike (collectives: a
    rank that raised alone would leave the others waiting until a timeout)."""
    sent = index = raised = None
    if accelerator.is_main_process:
        try:
            if not index_file(recipe.data).is_file():
                print(f"alexdist: indexing {recipe.data.source} (once; `alexdist index` does it ahead of a job)",
                      file=sys.stderr, flush=True)
                index = build_index(recipe.data, progress=True)
            else:
                index = load_index(recipe.data)
            sent = index.generation
        except AlexdistError as exc:
            sent = exc
        except Exception as exc:  # an OS error or a bug: raised here as it is, in one line on the others
            sent, raised = SetupError(f"rank 0 failed to index {recipe.data.source} ({brief(exc)})"), exc
    sent = from_main(accelerator, sent)
    if raised is not None:
        raise raised
    if isinstance(sent, AlexdistError):
        raise sent
    error = None
    if not accelerator.is_main_process:
        try:
            index = load_index(recipe.data, sent)
        except Exception as exc:  # any failure here is said on every rank, never left to a collective's timeout
            why = exc if isinstance(exc, AlexdistError) else brief(exc)
            error = f"{socket.gethostname()}\t{cache_root(recipe.data)}\t{why}"
    if failed := first_failure(accelerator, error):
        rank, (host, cache, why) = failed[0], failed[1].split("\t", 2)
        raise DataError(f"rank {rank} on {host} cannot read the index rank 0 loaded ({why}); data.cache_dir (or "
                        f"$ALEXDIST_CACHE), there '{cache}', must be on a file system every node mounts")
    return index


def _normalization(recipe: Recipe, index: DataIndex, resumed: dict | None) -> tuple[tuple, tuple]:
    """data.mean/std as set, else the checkpoint's a resume continues, else the index's measured figures. The
    checkpoint's first: an exact resume, though the index measures others after a rebuild (a wiped cache, another
    Pillow); set ones are config, whose changes a resume refuses."""
    cfg, resumed = recipe.data, resumed or {}
    return tuple(cfg.mean or resumed.get("mean") or index.mean), tuple(cfg.std or resumed.get("std") or index.std)


def streamed_run_data(recipe: Recipe, accelerator, resumed_norm: dict | None = None) -> RunData:
    """This rank's streamed data; `resumed_norm`: the normalization the checkpoint this run resumes recorded."""
    cfg, t = recipe.data, recipe.train
    index = _index_once(recipe, accelerator)
    labels = torch.from_numpy(np.array(index.train.labels, dtype=np.int64))  # a copy: the index is read-only
    if accelerator.is_main_process:
        if gaps := label_gap_warning(labels, index.classes):
            print(f"alexdist: warning: {gaps}", file=sys.stderr, flush=True)
        if index.skipped:
            print(f"alexdist: skipped {index.skipped} unreadable images (data.skip_corrupt)", file=sys.stderr,
                  flush=True)
    train_entries, val_entries, fingerprint = np.arange(len(labels)), None, None
    if cfg.val_split is not None:
        split = stratified_split(labels, cfg.val_split, index.classes)
        train_entries, val_entries, fingerprint = split.train_idx.numpy(), split.val_idx.numpy(), split.fingerprint
    mean, std = _normalization(recipe, index, resumed_norm)
    input_size = resolve_input_size(recipe.model.name, recipe.model.input_size)
    workers = default_workers(local_processes()) if cfg.workers is None else cfg.workers
    device = accelerator.device
    batches = StreamBatches(index.train, train_entries, t.batch_size, t.grad_accum, accelerator.process_index,
                            accelerator.num_processes, t.seed, recipe.augment, cfg.image_size, input_size, device,
                            workers, mean, std)
    eval_resize = eval_resize_of(cfg.image_size, cfg.eval_resize, recipe.augment.random_resized_crop)

    def eval_set(split, entries: np.ndarray) -> StreamEvalSet:
        return StreamEvalSet(split, entries, cfg.image_size, eval_resize, input_size, device, workers, mean, std)

    val = None if val_entries is None else eval_set(index.train, val_entries)
    test = eval_set(index.test, np.arange(len(index.test)))
    return RunData(batches, val, test, index.classes, fingerprint, len(train_entries), "stream", index.fingerprint,
                   mean, std)
