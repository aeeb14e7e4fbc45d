"""The validation split (data.val_split): training images held out for model selection, so that the test set is
read only to report, never to choose (the best checkpoint, train.stop_at_acc, tracking.time_to_acc, a sweep's
metric and `alexdist compare`'s ranking all read validation accuracy when a split exists).

The split is stratified by class (each class gives the same share, by largest remainders for a count) and drawn
with a fixed seed of its own: it depends on the training labels and data.val_split alone, never on train.seed,
so runs that differ in their seed select on the same images. Its fingerprint (the held-out indices' SHA-256)
is saved in every checkpoint, and a resume whose split differs is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from alexdist.errors import DataError

SPLIT_SEED = 20_180_801  # fixed: the split never follows train.seed


@dataclass
class Split:
    train_idx: torch.Tensor  # indices into the training set, sorted
    val_idx: torch.Tensor  # the held-out ones, sorted
    fingerprint: str  # first 16 hex digits of the SHA-256 of val_idx (int64, little-endian)


def held_out_count(spec: int | float, n: int) -> int:
    """data.val_split as a number of images: a count as it is, a fraction of the `n` training images rounded."""
    return spec if isinstance(spec, int) else round(spec * n)


def class_quotas(counts: list[int], total: int) -> list[int]:
    """How many images each class gives to a split of `total`: proportional to its count, by largest remainders
    (ties to the lower class index), so the quotas add up to `total` exactly."""
    n = sum(counts)
    exact = [c * total / n for c in counts]
    quotas = [int(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in order[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def stratified_split(labels: torch.Tensor, spec: int | float, classes: list[str]) -> Split:
    """Hold out data.val_split of the training images, stratified by class; refused in one line if it leaves a
    class that has training images with none left for training or none for validation."""
    n = len(labels)
    total = held_out_count(spec, n)
    if not 0 < total < n:
        raise DataError(f"data.val_split={spec} holds out {total} of the {n} training images; give a count between "
                        f"1 and {n - 1} or a fraction between 0 and 1")
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    quotas = class_quotas(counts, total)
    for k, (count, quota) in enumerate(zip(counts, quotas, strict=True)):
        if count and not 0 < quota < count:
            side = "validation" if quota == 0 else "training"
            raise DataError(
                f"data.val_split={spec} leaves class {classes[k]!r} ({count} training images) with no {side} images; "
                f"{'raise' if quota == 0 else 'lower'} data.val_split, or drop data.val_split to select on the test set"
            )
    g = torch.Generator().manual_seed(SPLIT_SEED)
    held = []
    for k, quota in enumerate(quotas):
        members = (labels == k).nonzero().flatten()
        held.append(members[torch.randperm(len(members), generator=g)[:quota]])
    val_idx = torch.cat(held).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[val_idx] = False
    return Split(keep.nonzero().flatten(), val_idx, fingerprint(val_idx))


def fingerprint(idx: torch.Tensor) -> str:
    return hashlib.sha256(idx.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()[:16]
