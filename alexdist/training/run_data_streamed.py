"""The streamed path's run data (data.loader=stream, or auto for a set larger than memory): the index built once
(by rank 0, when missing; `alexdist index` builds it ahead of a job) and read by every rank, the validation split
held out of its training entries, and loader workers per rank."""

from __future__ import annotations

import sys

import numpy as np
import torch

from alexdist.config import Recipe
from alexdist.data.choice import default_workers
from alexdist.data.crops import eval_resize_of
from alexdist.data.dataset import label_gap_warning
from alexdist.data.streamed import StreamBatches, StreamEvalSet
from alexdist.data.validation import stratified_split
from alexdist.distributed.accelerator import local_processes
from alexdist.models import resolve_input_size
from alexdist.training.run_inputs import RunData


def _index_once(recipe: Recipe, accelerator):
    """The source's index: built by rank 0 if missing (under data.cache_dir, which every node must see), then
    loaded (memory-mapped) by every rank."""
    from alexdist.data.index import build_index, index_file, load_index

    if accelerator.is_main_process and not index_file(recipe.data).is_file():
        print(f"alexdist: indexing {recipe.data.source} (once; `alexdist index` does it ahead of a job)",
              file=sys.stderr, flush=True)
        build_index(recipe.data, progress=True)
    accelerator.wait_for_everyone()
    return load_index(recipe.data)


def streamed_run_data(recipe: Recipe, accelerator) -> RunData:
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
    mean, std = tuple(cfg.mean or index.mean), tuple(cfg.std or index.std)
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
