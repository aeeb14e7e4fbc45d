"""The sample order of both data paths, as pure functions of (seed, epoch, position): never of the rank, the
number of processes or loader workers, or the accumulation. Any world size and accumulation that keep the same
effective batch E = batch x world x accum see the same samples, augmented the same way, in every optimizer step:

    epoch order       perm = randperm(N, seed + epoch)          (the same on every rank)
    step s            perm[s*E:(s+1)*E]
    micro j, rank r   the (j*world + r)-th slice of batch size within that step

The last E-incomplete part of each epoch is dropped (different samples each epoch, as the order changes). A
resume needs only (epoch, step): no sampler or loader state is saved, which is what lets a run resume at any step
on another world size (MosaicML Streaming's partition/shuffle modules make the same choice).
"""

from __future__ import annotations

import torch


def epoch_permutation(n: int, seed: int, epoch: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The epoch's order. The same permutation in any integer dtype that holds n (torch draws it alike): the
    streamed path keeps it as int32, 4 bytes a sample (tests/unit/test_order.py)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g, dtype=dtype)


def epoch_augment_params(n: int, seed: int, epoch: int, padding: int, flip: bool,
                         dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """(n, 3): crop offsets dy, dx in [0, 2*padding] and a flip bit, one row per epoch position; the same values
    in any integer dtype (the streamed path keeps int16: 6 bytes a sample)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_777_777)
    offs = torch.randint(0, 2 * padding + 1, (n, 2), generator=g, dtype=dtype)
    flips = torch.randint(0, 2, (n, 1), generator=g, dtype=dtype) if flip else torch.zeros(n, 1, dtype=dtype)
    return torch.cat([offs, flips], dim=1)


def micro_positions(step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int) -> slice:
    """Positions in the epoch order of `rank`'s micro-batch `micro` of optimizer step `step`."""
    start = step * batch_size * world * grad_accum + (micro * world + rank) * batch_size
    return slice(start, start + batch_size)


def eval_shard(n: int, rank: int, world: int) -> torch.Tensor:
    """Contiguous, disjoint evaluation indices for this rank; together they are every image exactly once."""
    return torch.tensor_split(torch.arange(n), world)[rank]


class StepLayout:
    """How an optimizer step's samples split over ranks and micro-batches (both data paths' batches inherit it)."""

    batch_size: int
    grad_accum: int
    rank: int
    world: int

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.world * self.grad_accum

    def positions(self, step: int, micro: int) -> slice:
        """Positions in the epoch order of this rank's micro-batch `micro` of optimizer step `step`."""
        return micro_positions(step, micro, self.rank, self.world, self.batch_size, self.grad_accum)
