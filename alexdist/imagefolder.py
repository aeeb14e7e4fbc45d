"""An image-folder dataset, torchvision's ImageFolder layout with a train and a test split:

    DIR/train/cat/0001.png  DIR/train/dog/...   DIR/test/cat/...  DIR/test/dog/...

Class names are the train split's folder names, sorted (label i = i-th name), as ImageFolder assigns them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from alexdist.errors import DataError


def read_image_folder(root: Path):
    """Train and test splits, listed by torchvision's own ImageFolder helpers (`find_classes`, `make_dataset`),
    with the train split's class indices for both; decoded and checked here (32x32, any mode)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    from alexdist.data import Dataset

    classes, class_to_idx = find_classes(root / "train")
    out = []
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"'{root}' has no '{split}' folder; an image folder needs train/CLASS/* and test/CLASS/*")
        extra = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in class_to_idx)
        if extra:
            raise DataError(f"'{folder}' has class folders the train split lacks ({', '.join(extra)}); every test "
                            f"class must be a train class")
        samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise DataError(f"'{folder}' holds no images (.png, .jpg, ...) in its class folders")
        out += [torch.from_numpy(np.stack([_read(Path(f)) for f, _ in samples])).permute(0, 3, 1, 2).contiguous(),
                torch.tensor([label for _, label in samples], dtype=torch.int64)]
    return Dataset(*out, classes)


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise DataError(f"'{path}' is not a readable image ({type(exc).__name__}); fix or remove it") from None
    if arr.shape != (32, 32, 3):
        raise DataError(f"'{path}' is {arr.shape[1]}x{arr.shape[0]}; the models train on 32x32 images: resize the "
                        f"dataset's images to 32x32")
    return arr
