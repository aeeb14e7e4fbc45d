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


PREFETCH = 4  # micro-batches each loader worker keeps ready (DataLoader's prefetch_factor)
# Batch buffers each worker reuses in turn. The trainer holds at most PREFETCH + 1 of a worker's batches at once
# (DataLoader sends a worker a new job only as the trainer takes one of its PREFETCH in flight, and the trainer
# keeps only the last one it took: it normalizes each into a new float tensor), so the one written next is free;
# one more for margin. A new shared batch per job instead costs 0.11 CPU ms an image at 224 px (fresh pages
# zeroed and mapped: 5 % of a decode), a reused one 0.007.
RING = PREFETCH + 2


class _Reader(torch.utils.data.Dataset):
    """Decodes one micro-batch per item, in a loader worker (or in the trainer with data.workers=0), straight into
    one uint8 batch tensor: in a worker, one of its RING buffers in shared memory, so what crosses to the trainer
    is a handle (a tensor in the worker's own memory would be copied into shared memory on the way)."""

    def __init__(self, split, decode, size: int, channels_last: bool):
        self.split, self.decode = split, decode  # the split's arrays are memory-mapped: shared, never copied
        self.size, self.channels_last = size, channels_last
        self._ring: list[torch.Tensor] = []  # this worker's buffers (each worker fills its own copy)
        self._turn = 0

    def _batch(self, n: int) -> torch.Tensor:
        """An (n, 3, S, S) uint8 batch to fill; channels last where the decoder's crops are (decode.py: each crop
        is then a plain copy)."""
        s = self.size
        shape, stride = (n, 3, s, s), ((3 * s * s, 1, 3 * s, 3) if self.channels_last else (3 * s * s, s * s, s, 1))
        if torch.utils.data.get_worker_info() is None:  # in the trainer: nothing to share
            return torch.empty_strided(shape, stride, dtype=torch.uint8)
        slot, self._turn = self._turn % RING, self._turn + 1
        if slot == len(self._ring) or len(self._ring[slot]) < n:
            storage = torch.UntypedStorage._new_shared(n * 3 * s * s)  # shared from the start: never copied
            buf = torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape, stride)
            self._ring[slot:slot + 1] = [buf]
        return self._ring[slot][:n]

    def __getitem__(self, job: tuple[np.ndarray, np.ndarray | None]):
        ids, params = job
        x = self._batch(len(ids))
        for k, i in enumerate(ids):
            try:
                i = int(i)
                x[k] = self.decode(self.split.read(i), None if params is None else params[k],
                                   name=self.split.name(i))
            except DataError as exc:
                return _Failed(str(exc))
            except Exception as exc:  # a file that decodes badly although it indexed well
                return _Failed(f"'{self.split.name(int(i))}' could not be decoded ({type(exc).__name__}: {exc}); "
                               f"fix or remove it and index again (alexdist index)")
        return x, torch.from_numpy(np.asarray(self.split.labels[ids], dtype=np.int64))


class _Jobs(torch.utils.data.Sampler):
    """The micro-batches to read, in order; set by the owner before each pass (a plain iterable of jobs)."""

    def __init__(self):
        self.jobs: Iterator = iter(())

    def __iter__(self):
        return self.jobs


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


def _loader(reader: _Reader, jobs: _Jobs, workers: int, device: torch.device,
            persistent: bool) -> torch.utils.data.DataLoader:
    # A generator of its own: each new iterator draws its workers' base seed from it, which would otherwise
    # advance the global RNG and so change the dropout masks (the workers draw nothing at random).
    return torch.utils.data.DataLoader(
        reader, batch_size=None, sampler=jobs, num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH if workers else None, persistent_workers=persistent and workers > 0,
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


def _device_batch(item, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A worker's batch on the device, the images in the contiguous layout the in-memory path hands the model
    (a channels-last batch is made contiguous there, as uint8: a quarter of the bytes of the float batch)."""
    x, y = _unpack(item)
    return to_device(x, device).contiguous(), to_device(y, device)


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

        # int32 entry ids where they fit: the trainer keeps them all run long (4 bytes a sample, not 8).
        self.entries = np.asarray(self.entries, dtype=np.int32 if len(self.split) < 2**31 else np.int64)
        decode = partial(decode_train, size=self.image_size, aug=self.augment_cfg)
        reader = _Reader(self.split, decode, self.image_size, self.augment_cfg.random_resized_crop)
        self._loader = _loader(reader, self._jobs, self.workers, self.device, True)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.entries) // self.effective_batch

    def _epoch_jobs(self, epoch: int, start_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n, aug = len(self.entries), self.augment_cfg
        # Drawn straight in the small dtypes the trainer keeps (4 + 6 bytes a sample): an int64 draw cast down
        # would leave 48 bytes a sample of freed heap that the allocator keeps (benchmarks/loader_memory.py).
        perm = epoch_permutation(n, self.seed, epoch, _index_dtype(n)).numpy()
        pad = None
        if not aug.random_resized_crop:  # the in-memory path's parameters, so both paths crop alike
            pad = epoch_augment_params(n, self.seed, epoch, aug.crop_padding, aug.flip, torch.int16).numpy()
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
                x, y = _device_batch(next(items), self.device)
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
        reader = _Reader(self.split, decode, self.image_size, self.eval_resize is not None)
        self._loader = _loader(reader, self._jobs, self.workers, self.device, False)

    def __len__(self) -> int:
        return len(self.entries)

    def n_batches(self, rank: int, world: int, batch_size: int) -> int:
        return -(-len(eval_shard(len(self.entries), rank, world)) // batch_size)

    def batches(self, rank: int, world: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shard = self.entries[eval_shard(len(self.entries), rank, world).numpy()]
        self._jobs.jobs = iter([(shard[i:i + batch_size], None) for i in range(0, len(shard), batch_size)])
        for item in self._loader:
            x, y = _device_batch(item, self.device)
            yield normalize(x, self.input_size, self.mean, self.std), y
