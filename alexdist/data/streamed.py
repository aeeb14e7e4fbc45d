"""Batches streamed from disk: encoded images behind an index (index.py), read and decoded by loader worker
processes, each rank reading only its own samples. The order and the augmentation parameters are order.py's and
crops.py's pure functions of (seed, epoch, position), computed in the trainer and handed to the workers with the
sample ids, so a batch does not depend on the number of workers and a resume needs no loader state.

Each DataLoader item is a whole micro-batch: the sampler yields (ids, params) per micro-batch, a worker reads and
decodes those images into one uint8 tensor, and the trainer normalises it on the device (batches.normalize), as
the in-memory path does: uint8 crosses the process boundary (4x less than float) and the device does the rest.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from alexdist.config import AugmentConfig
from alexdist.data.batches import CIFAR_MEAN, CIFAR_STD, Stats, normalize, to_device
from alexdist.data.interface import MicroBatches
from alexdist.data.order import StepLayout, epoch_augment_params, epoch_permutation, eval_shard
from alexdist.errors import DataError


class _Failed:
    """A worker's DataError, carried back as data: DataLoader re-raises a worker's exception with the worker's
    traceback in its message, and the user is owed one line."""

    def __init__(self, message: str):
        self.message = message


class _Reader(torch.utils.data.Dataset):
    """Decodes one micro-batch per item, in a loader worker (or in the trainer with data.workers=0)."""

    def __init__(self, split, decode):
        self.split, self.decode = split, decode  # the split's arrays are memory-mapped: shared, never copied

    def __getitem__(self, job: tuple[np.ndarray, np.ndarray | None]):
        ids, params = job
        images = []
        for k, i in enumerate(ids):
            try:
                i = int(i)
                images.append(self.decode(self.split.read(i), None if params is None else params[k],
                                          name=self.split.name(i)))
            except DataError as exc:
                return _Failed(str(exc))
            except Exception as exc:  # a file that decodes badly although it indexed well
                return _Failed(f"'{self.split.name(int(i))}' could not be decoded ({type(exc).__name__}: {exc}); "
                               f"fix or remove it and index again (alexdist index)")
        return torch.stack(images), torch.from_numpy(np.asarray(self.split.labels[ids], dtype=np.int64))


class _Jobs(torch.utils.data.Sampler):
    """The micro-batches to read, in order; set by the owner before each pass (a plain iterable of jobs)."""

    def __init__(self):
        self.jobs: Iterator = iter(())

    def __iter__(self):
        return self.jobs


def default_workers() -> int:
    """The cores per local process, at most 8 (torchvision's references use 16 per GPU on large nodes)."""
    per = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per))


def _loader(reader: _Reader, jobs: _Jobs, workers: int, device: torch.device,
            persistent: bool) -> torch.utils.data.DataLoader:
    # A generator of its own: each new iterator draws its workers' base seed from it, which would otherwise
    # advance the global RNG and so change the dropout masks (the workers draw nothing at random).
    return torch.utils.data.DataLoader(
        reader, batch_size=None, sampler=jobs, num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=persistent and workers > 0,
        generator=torch.Generator(), worker_init_fn=_ignore_stop_signals,
    )


def _ignore_stop_signals(_worker: int) -> None:
    """A stop request (scancel, a second Ctrl-C) reaches every process of the job; torch's worker handler would
    let SIGTERM kill the worker and so crash the trainer mid-step, before its checkpoint. The trainer stops the
    workers itself (they also leave when it dies)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _decode_eval(data: bytes, params, size: int, eval_resize: int | None, name: str) -> torch.Tensor:
    from alexdist.data.decode import decode_eval

    return decode_eval(data, size, eval_resize, name=name)


def _unpack(item) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, _Failed):
        rank = int(os.environ.get("RANK", "0"))
        if rank:  # only rank 0 prints a run's error line, and this rank alone read the file
            print(f"alexdist: rank {rank}: {item.message}", file=sys.stderr, flush=True)
        raise DataError(item.message)
    return item


@dataclass
class StreamBatches(StepLayout):
    """This rank's streamed micro-batches, grouped by optimizer step (TrainBatches' interface)."""

    split: object  # index.SplitIndex of the training split
    entries: np.ndarray  # the training entries of `split` (all of them, or those data.val_split leaves)
    batch_size: int
    grad_accum: int
    rank: int
    world: int
    seed: int
    augment_cfg: AugmentConfig
    image_size: int
    input_size: int
    device: torch.device
    workers: int
    mean: Stats = CIFAR_MEAN
    std: Stats = CIFAR_STD
    _jobs: _Jobs = field(default_factory=_Jobs, init=False)

    def __post_init__(self) -> None:
        from alexdist.data.decode import decode_train

        decode = partial(decode_train, size=self.image_size, aug=self.augment_cfg)
        self._loader = _loader(_Reader(self.split, decode), self._jobs, self.workers, self.device, True)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.entries) // self.effective_batch

    def _epoch_jobs(self, epoch: int, start_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n, aug = len(self.entries), self.augment_cfg
        # int32 where it fits: the trainer keeps the epoch's order, 4 bytes per sample instead of 8.
        perm = epoch_permutation(n, self.seed, epoch).numpy().astype(np.int32 if n < 2**31 else np.int64)
        pad = None
        if not aug.random_resized_crop:  # the in-memory path's parameters, so both paths crop alike
            pad = epoch_augment_params(n, self.seed, epoch, aug.crop_padding, aug.flip).numpy().astype(np.int16)
        for step in range(start_step, self.steps_per_epoch):
            for j in range(self.grad_accum):
                pos = self.positions(step, j)
                if pad is None:
                    from alexdist.data.crops import rrc_params

                    params = rrc_params(self.seed, epoch, np.arange(pos.start, pos.stop))
                else:
                    params = pad[pos].astype(np.int64)
                yield self.entries[perm[pos]], params

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[MicroBatches]:
        self._jobs.jobs = self._epoch_jobs(epoch, start_step)
        items = iter(self._loader)
        for _ in range(start_step, self.steps_per_epoch):
            micro = []
            for _ in range(self.grad_accum):
                x, y = _unpack(next(items))
                x, y = to_device(x, self.device), to_device(y, self.device)
                micro.append((normalize(x, self.input_size, self.mean, self.std), y))
            yield micro


@dataclass
class StreamEvalSet:
    """An evaluation split read from disk: each rank decodes its own contiguous shard (EvalSet's interface)."""

    split: object  # index.SplitIndex
    entries: np.ndarray  # which entries of `split` form this evaluation set
    image_size: int
    eval_resize: int | None
    input_size: int
    device: torch.device
    workers: int
    mean: Stats = CIFAR_MEAN
    std: Stats = CIFAR_STD
    _jobs: _Jobs = field(default_factory=_Jobs, init=False)

    def __post_init__(self) -> None:
        decode = partial(_decode_eval, size=self.image_size, eval_resize=self.eval_resize)
        # Workers start per evaluation (not kept): val and test sets would otherwise each hold a pool all run long.
        self._loader = _loader(_Reader(self.split, decode), self._jobs, self.workers, self.device, False)

    def __len__(self) -> int:
        return len(self.entries)

    def n_batches(self, rank: int, world: int, batch_size: int) -> int:
        return -(-len(eval_shard(len(self.entries), rank, world)) // batch_size)

    def batches(self, rank: int, world: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shard = self.entries[eval_shard(len(self.entries), rank, world).numpy()]
        self._jobs.jobs = iter([(shard[i:i + batch_size], None) for i in range(0, len(shard), batch_size)])
        for item in self._loader:
            x, y = _unpack(item)
            x, y = to_device(x, self.device), to_device(y, self.device)
            yield normalize(x, self.input_size, self.mean, self.std), y
