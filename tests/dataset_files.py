"""Datasets written on disk in the layouts users bring, for the data tests: PNG bytes in any PIL mode, random
images, parquet as pandas writes it (no Hub metadata), and an image folder (torchvision's ImageFolder layout)."""

import io

import numpy as np
from PIL import Image


def png(arr: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def pandas_parquet(root, labels=None, sizes=None):
    """Parquet as pandas writes it: an 'img' column of {'bytes', 'path'} records and integer labels, no Hub
    feature metadata."""
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 24), ("test", 8)):
        x = images(n, seed=n)
        imgs = [{"bytes": png(a if not sizes or i not in sizes else a[:sizes[i], :sizes[i]]), "path": None}
                for i, a in enumerate(x)]
        y = [i % 4 for i in range(n)] if labels is None or split == "test" else labels(n)
        pd.DataFrame({"img": imgs, "label": y}).to_parquet(root / f"{split}-00000-of-00001.parquet")
    return root


def image_folder(root, classes=("cat", "dog", "fox"), test_classes=None, per_class=4, shape=(32, 32),
                  empty_train=()):
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            if split == "train" and name in empty_train:
                continue
            rng = np.random.default_rng(c * 10 + len(split))
            for i, a in enumerate(rng.integers(0, 256, (per_class, *shape, 3), dtype=np.uint8)):
                mode = ("RGB", "L", "RGBA", "P")[i % 4]  # any mode PIL reads
                (root / split / name / f"{i}.png").write_bytes(png(a, mode))
    return root
