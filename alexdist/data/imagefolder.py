"""An image-folder dataset, torchvision's ImageFolder layout with a train and a test split:

    DIR/train/cat/0001.png  DIR/train/dog/...   DIR/test/cat/...  DIR/test/dog/...   (or DIR/val/..., ImageNet's)

Class names are the train split's folder names, sorted (label i = i-th name), as ImageFolder assigns them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from alexdist.data.dataset import Dataset, check_fits, image_tensor
from alexdist.data.index_folder import test_folder
from alexdist.errors import DataError


def read_image_folder(root: Path, size: int = 32) -> Dataset:
    """Train and test splits, listed by torchvision's own ImageFolder helpers (`find_classes`, `make_dataset`),
    with the train split's class indices for both; decoded here (any size and mode, stored at `size`)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    classes, class_to_idx = find_classes(root / "train")
    listed = []
    # ImageNet's layout names the evaluation split `val`: alexdist's test split (data.val_split holds out of train).
    test = test_folder(root) or "test"  # the index's rule; none: "test" is said missing below
    for split in ("train", test):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"'{root}' has no '{split}' folder; an image folder needs train/CLASS/* and test/CLASS/* "
                            f"(or val/CLASS/*, ImageNet's layout)")
        extra = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in class_to_idx)
        if extra:
            raise DataError(f"'{folder}' has class folders the train split lacks ({', '.join(extra)}); every test "
                            f"class must be a train class")
        samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise DataError(f"'{folder}' holds no images (.png, .jpg, ...) in its class folders")
        listed.append(samples)
    check_fits(sum(map(len, listed)), size, str(root))  # before decoding anything
    out, resized = [], 0
    for samples in listed:
        decoded = [image_tensor(_read(Path(f)), size) for f, _ in samples]
        resized += sum(r for _, r in decoded)
        out += [torch.stack([t for t, _ in decoded]), torch.tensor([label for _, label in samples], dtype=torch.int64)]
    return Dataset(*out, classes, resized=resized)


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))  # grayscale, palette, RGBA: as RGB
    except Exception as exc:
        raise DataError(f"'{path}' is not a readable image ({type(exc).__name__}); fix or remove it") from None
