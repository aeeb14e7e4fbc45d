"""The dataset every source decodes to: uint8 image tensors (N, 3, S, S) at data.image_size S, int64 labels and
the class names, checked once at load time (sources.py decodes, cache.py caches, batches.py feeds the model).
One resampling for every source and split (`resize`), and the checks made before and after decoding: memory,
labels, label gaps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from alexdist.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Dataset:
    train_x: torch.Tensor  # uint8 (N, 3, 32, 32)
    train_y: torch.Tensor  # int64 (N,) in [0, len(classes))
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]  # label i is classes[i]; the model's head has len(classes) outputs
    resized: int = 0  # images resized to data.image_size at decode time (not cached: said once, when decoded)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"train_x": self.train_x, "train_y": self.train_y, "test_x": self.test_x, "test_y": self.test_y}


def check_labels(ds: Dataset, where: str) -> None:
    """Every split non-empty, every label one of the classes: checked once at load time, before any training
    (a label out of range would otherwise fail mid-run inside the loss)."""
    k = len(ds.classes)
    for split, y in (("train", ds.train_y), ("test", ds.test_y)):
        if len(y) == 0:
            raise DataError(f"'{where}' has an empty {split} split; give it images (both train and test are needed)")
        bad = ((y < 0) | (y >= k)).nonzero()
        if len(bad):
            row = int(bad[0])
            raise DataError(f"'{where}' {split} row {row} has label {int(y[row])}, outside the {k} classes 0..{k - 1}; "
                            f"fix the labels (or the class list) of that split")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> uint8 (N, 3, size, size) by antialiased bilinear interpolation: what torchvision's
    Resize does on tensors and PIL's bilinear does, so that downscaling averages rather than aliases. The one
    resampling every source and split goes through."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def image_tensor(arr, size: int) -> tuple[torch.Tensor, bool]:
    """uint8 (3, size, size) from one decoded HWC uint8 RGB array, and whether it had to be resized."""
    t = torch.tensor(arr).permute(2, 0, 1)  # a copy: PIL's arrays are read-only
    resized = t.shape[-2:] != (size, size)
    return (resize(t[None], size)[0] if resized else t.contiguous()), resized


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux's MemAvailable; physical memory elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(n_images: int, size: int, where: str) -> None:
    """Refuse, before decoding, a dataset that would not fit in memory at data.image_size: the decoded uint8
    images plus the training batches' zero-padded and mirrored copy (batches.TrainBatches: twice the images)."""
    need = 3 * n_images * 3 * size * size
    have = available_memory()
    if need > 0.8 * have:
        gib = 2**30
        raise DataError(f"'{where}' at data.image_size={size}: {n_images} images take about {need / gib:.1f} GiB in "
                        f"memory (decoded, plus the training copies), more than the {have / gib:.1f} GiB available; "
                        f"lower data.image_size (model.input_size upsamples on the device) or use more memory")


def label_gap_warning(train_y: torch.Tensor, classes: list[str]) -> str | None:
    """One line naming the classes that never occur in the train split, or None: such a class is an output the
    model can only get wrong (a stray label 12 makes a 13-way head; an empty class folder a class of its own)."""
    counts = torch.bincount(torch.as_tensor(train_y), minlength=len(classes))
    missing = [i for i in range(len(classes)) if counts[i] == 0]
    if not missing:
        return None
    head = f"the head has {len(classes)} outputs"
    if all(name == str(i) for i, name in enumerate(classes)):  # labels from the data, no names
        return f"labels {', '.join(map(str, missing))} never occur in train; {head}"
    names = ", ".join(f"{classes[i]} (label {i})" for i in missing)
    return f"classes {names} have no train images: the model can only get them wrong; {head}"
