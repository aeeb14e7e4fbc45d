"""An image-folder dataset, torchvision's ImageFolder layout with a train and a test split:

    DIR/train/cat/0001.png  DIR/train/dog/...   DIR/test/cat/...  DIR/test/dog/...

Class names are the train split's folder names, sorted (label i = i-th name), as ImageFolder assigns them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from alexdist.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_image_folder(root: Path):
    from alexdist.data import Dataset

    train = root / "train"
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    out = []
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"'{root}' has no '{split}' folder; an image folder needs train/CLASS/* and test/CLASS/*")
        extra = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in classes)
        if extra:
            raise DataError(f"'{folder}' has class folders the train split lacks ({', '.join(extra)}); every test "
                            f"class must be a train class")
        images, labels = [], []
        for label, name in enumerate(classes):
            files = sorted(f for f in (folder / name).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES) \
                if (folder / name).is_dir() else []
            images += [_read(f) for f in files]
            labels += [label] * len(files)
        if not images:
            raise DataError(f"'{folder}' holds no images (.png, .jpg, ...) in its class folders")
        out += [torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(labels, dtype=torch.int64)]
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
