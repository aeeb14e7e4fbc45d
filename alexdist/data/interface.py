"""What the training loop and the evaluation see of the data, whichever path holds it (batches.py in memory,
streamed.py from disk): the loop never knows which one it has."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]  # one optimizer step: grad_accum (inputs, labels) pairs


class Batches(Protocol):
    """This rank's training batches, grouped by optimizer step, in order.py's order."""

    @property
    def effective_batch(self) -> int: ...

    @property
    def steps_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[MicroBatches]: ...


class EvalSet(Protocol):
    """An evaluation split, handed out to each rank as its own contiguous shard in batches of normalised inputs."""

    def __len__(self) -> int: ...

    def n_batches(self, rank: int, world: int, batch_size: int) -> int: ...

    def batches(self, rank: int, world: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
