"""Dataset sources -> uint8 image tensors (N, 3, 32, 32) and int64 labels, decoded once and cached on disk.

Sources (`data.source`):
- a Hub id such as `uoft-cs/cifar10`, loaded with `datasets` (needs the network, or the Hub cache);
- a local folder in the Hub's parquet layout (`.../train-*.parquet`, `.../test-*.parquet`, as written by
  `hf download uoft-cs/cifar10 --repo-type dataset --local-dir DIR`);
- a local torchvision `cifar-10-batches-py` folder (or its parent);
- a local image folder, one folder per class as torchvision's ImageFolder: `train/CLASS/*.png`,
  `test/CLASS/*.png` (alexdist.imagefolder);
- `digits`: scikit-learn's bundled 8x8 handwritten digits, upscaled to 32x32x3 (real data, no network);
- `synthetic`: random images, for benchmarks.

The number of classes comes from the data (the label's ClassLabel names, the image folder's class folders,
else 0..max label; CIFAR-100's `fine_label` is found as well as `label`), and the model's head follows it.
Images must be 32x32 (any mode: converted to RGB); a bad label, an unreadable or mis-sized image, a missing or
empty split stops the load with one line naming the file or row and the fix, before any training.

The decoded tensors are cached as one safetensors file per source (no pickle, memory-mapped, loads in
milliseconds). A cache that fails to load is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alexdist.config import DataConfig
from alexdist.errors import DataError
from alexdist.fileio import atomic_path

CACHE_VERSION = 2  # bump when the decoded format changes (2: class names in the cache's metadata)


@dataclass
class Dataset:
    train_x: torch.Tensor  # uint8 (N, 3, 32, 32)
    train_y: torch.Tensor  # int64 (N,) in [0, len(classes))
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]  # label i is classes[i]; the model's head has len(classes) outputs

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"train_x": self.train_x, "train_y": self.train_y, "test_x": self.test_x, "test_y": self.test_y}


def _default_cache_dir() -> Path:
    return Path(os.environ.get("ALEXDIST_CACHE", Path.home() / ".cache" / "alexdist"))


def detect_layout(path: Path) -> str:
    """'parquet' | 'torchvision' for a local folder, or DataError naming both expected layouts."""
    if (path / "data_batch_1").is_file() or (path / "cifar-10-batches-py" / "data_batch_1").is_file():
        return "torchvision"
    if any(path.rglob("train-*.parquet")) and any(path.rglob("test-*.parquet")):
        return "parquet"
    if (path / "train").is_dir() and any(d.is_dir() for d in (path / "train").iterdir()):
        return "imagefolder"
    raise DataError(
        f"'{path}' is in no known dataset layout: expected the Hub parquet layout (train-*.parquet and "
        f"test-*.parquet, from `hf download uoft-cs/cifar10 --repo-type dataset --local-dir DIR`), "
        f"torchvision's cifar-10-batches-py folder (data_batch_1..5, test_batch) or an image folder "
        f"(train/CLASS/*.png and test/CLASS/*.png)"
    )


def _source_key(cfg: DataConfig) -> str:
    """A cache key that changes when the source's content may have changed."""
    src = cfg.source
    if src == "synthetic":
        ident = f"synthetic:{cfg.synthetic_train}:{cfg.synthetic_test}"
    elif src == "digits":
        ident = "digits"
    elif Path(src).exists():
        p = Path(src).resolve()
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        ident = "local:" + "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    else:
        ident = f"hub:{src}:{cfg.revision}"
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{ident}".encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() else "_" for c in Path(src).name or src)[:40]
    return f"{name}-{digest}"


def cache_path(cfg: DataConfig) -> Path:
    root = Path(cfg.cache_dir) if cfg.cache_dir else _default_cache_dir()
    return root / f"{_source_key(cfg)}.safetensors"


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load from the cache, or decode the source and write the cache (atomically, so readers never see half)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = cache_path(cfg)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                t = {k: f.get_tensor(k) for k in ("train_x", "train_y", "test_x", "test_y")}
                classes = json.loads(f.metadata()["classes"])
            return Dataset(t["train_x"], t["train_y"], t["test_x"], t["test_y"], classes)
        except Exception as exc:  # truncated or corrupt: rebuilt, never trusted
            print(f"alexdist: dataset cache '{path}' is unreadable ({type(exc).__name__}); rebuilding it from "
                  f"{cfg.source}", file=sys.stderr)
    ds = decode_source(cfg)
    check_labels(ds, cfg.source)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in ds.tensors().items()}, str(tmp),
                  metadata={"classes": json.dumps(ds.classes)})
    return ds


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


def decode_source(cfg: DataConfig) -> Dataset:
    src = cfg.source
    if src == "synthetic":
        return _synthetic(cfg.synthetic_train, cfg.synthetic_test)
    if src == "digits":
        return _digits()
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise DataError(f"data.source '{src}' is a file; point it at the dataset folder")
        layout = detect_layout(p)
        if layout == "imagefolder":
            from alexdist.imagefolder import read_image_folder

            return read_image_folder(p)
        return _torchvision(p) if layout == "torchvision" else _parquet(p)
    if src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise DataError(
            f"data.source '{src}' does not exist; give an existing folder (Hub parquet or cifar-10-batches-py "
            f"layout), a Hub id such as uoft-cs/cifar10, 'digits' or 'synthetic'"
        )
    return _hub(src, cfg.revision)


def _hub(repo_id: str, revision: str | None) -> Dataset:
    import datasets

    try:
        dd = datasets.load_dataset(repo_id, revision=revision)
    except Exception as exc:
        raise DataError(
            f"could not load '{repo_id}' from the Hugging Face Hub ({type(exc).__name__}); with no network, copy it "
            f"from a machine that has one (`hf download {repo_id} --repo-type dataset --local-dir "
            f"DIR`) and set data.source=DIR"
        ) from None
    return _from_hf(dd, repo_id)


def _parquet(root: Path) -> Dataset:
    import datasets

    files = {split: sorted(str(f) for f in root.rglob(f"{split}-*.parquet")) for split in ("train", "test")}
    try:
        dd = datasets.load_dataset("parquet", data_files=files)
    except Exception as exc:
        raise DataError(f"could not read the parquet files under '{root}' ({exc}); re-download them") from None
    return _from_hf(dd, str(root))


LABEL_COLUMNS = ("label", "fine_label", "labels")  # CIFAR-10's, CIFAR-100's fine labels, other datasets'


def _from_hf(dd, where: str) -> Dataset:
    """Train and test splits of a Hub dataset (or parquet files): the image column (the Hub's Image feature, or
    pandas/pyarrow's {'bytes': ...} records) and the first label column found; class names from the label's
    ClassLabel feature, else 0..max label."""
    import datasets

    out, names = [], None
    for split in ("train", "test"):
        if split not in dd:
            raise DataError(f"'{where}' has no '{split}' split; expected a train and a test split")
        ds = dd[split]
        label = next((c for c in LABEL_COLUMNS if c in ds.features), None)
        image = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None) or next(
            (c for c in ds.column_names if c != label and isinstance(ds[0][c], dict) and "bytes" in ds[0][c]), None)
        if not image or not label:
            raise DataError(f"'{where}' has no image + label columns (found {list(ds.features)}); expected an image "
                            f"column and one of {', '.join(LABEL_COLUMNS)}")
        feature = ds.features[label]
        names = names or (list(feature.names) if isinstance(feature, datasets.ClassLabel) else None)
        out.append(_decode_images(ds.cast_column(image, datasets.Image(decode=False))[image], where, split))
        out.append(torch.tensor(ds[label], dtype=torch.int64))
    if names is None:
        names = [str(i) for i in range(int(max(out[1].max(), out[3].max())) + 1)]
    return Dataset(*out, names)


def _decode_images(records: list[dict], where: str, split: str) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) from encoded images; DataError naming the first row that is unreadable or not 32x32."""
    from PIL import Image

    arrays = []
    for row, rec in enumerate(records):
        try:
            with Image.open(io.BytesIO(rec["bytes"])) as im:
                arr = np.asarray(im.convert("RGB"))  # grayscale, palette, RGBA: as RGB
        except Exception as exc:
            raise DataError(f"'{where}' {split} row {row}: the image is not readable ({type(exc).__name__}); fix "
                            f"or drop that row") from None
        if arr.shape != (32, 32, 3):
            raise DataError(f"'{where}' {split} row {row}: the image is {arr.shape[1]}x{arr.shape[0]}, the models "
                            f"train on 32x32 images; resize the dataset's images to 32x32")
        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


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
                    # torchvision's own format is a Python pickle; only point this at a folder you trust.
                    d = pickle.load(fh, encoding="latin1")
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


def _synthetic(n_train: int, n_test: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], [f"class {i}" for i in range(10)])
