"""What a run's data path hands the run (run_data.py in memory, run_data_streamed.py from disk)."""

from __future__ import annotations

from dataclasses import dataclass

from alexdist.data.batches import CIFAR_MEAN, CIFAR_STD
from alexdist.data.interface import Batches, EvalSet


@dataclass
class RunData:
    batches: Batches  # this rank's training batches
    val: EvalSet | None  # the held-out split, None without data.val_split
    test: EvalSet
    classes: list[str]
    val_fingerprint: str | None  # the held-out indices' hash (checkpoints record it)
    train_images: int
    loader: str = "memory"  # the path taken: memory | stream (checkpoints record it)
    fingerprint: str | None = None  # streamed: the indexed files' hash (a resume on changed data is refused)
    mean: tuple[float, float, float] = CIFAR_MEAN  # the normalization the model is trained with
    std: tuple[float, float, float] = CIFAR_STD
