"""Dataset sources -> uint8 image tensors (N, 3, 32, 32) and int64 labels, decoded once and cached on disk.

Sources (`data.source`):
- a Hub id such as `uoft-cs/cifar10`, loaded with `datasets` (needs the network, or the Hub cache);
- a local folder in the Hub's parquet layout (`.../train-*.parquet`, `.../test-*.parquet`, as written by
  `hf download uoft-cs/cifar10 --repo-type dataset --local-dir DIR`);
- a local torchvision `cifar-10-batches-py` folder (or its parent);
- `digits`: scikit-learn's bundled 8x8 handwritten digits, upscaled to 32x32x3 (real data, no network);
- `synthetic`: random images, for benchmarks.

The decoded tensors are cached as one safetensors file per source (no pickle, memory-mapped, loads in
milliseconds). A cache that fails to load is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
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

CACHE_VERSION = 1  # bump when the decoded format changes


@dataclass
class Dataset:
    train_x: torch.Tensor  # uint8 (N, 3, 32, 32)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor

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
    raise DataError(
        f"'{path}' is in no known dataset layout: expected the Hub parquet layout (train-*.parquet and "
        f"test-*.parquet, from `hf download uoft-cs/cifar10 --repo-type dataset --local-dir DIR`) "
        f"or torchvision's cifar-10-batches-py folder (data_batch_1..5, test_batch)"
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


def class_names(cfg: DataConfig) -> list[str]:
    """The names of the 10 labels: CIFAR-10's for CIFAR-10 in any layout (label i is CIFAR10_CLASSES[i] in the
    Hub's parquet files and torchvision's batches alike), the digit for scikit-learn's digits."""
    if cfg.source == "digits":
        return [str(i) for i in range(10)]
    if cfg.source == "synthetic":
        return [f"class {i}" for i in range(10)]
    return list(CIFAR10_CLASSES)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load from the cache, or decode the source and write the cache (atomically, so readers never see half)."""
    from safetensors.torch import load_file, save_file

    path = cache_path(cfg)
    if path.is_file():
        try:
            t = load_file(str(path))
            return Dataset(t["train_x"], t["train_y"], t["test_x"], t["test_y"])
        except Exception as exc:  # truncated or corrupt: rebuilt, never trusted
            print(f"alexdist: dataset cache '{path}' is unreadable ({type(exc).__name__}); rebuilding it from "
                  f"{cfg.source}", file=sys.stderr)
    ds = decode_source(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in ds.tensors().items()}, str(tmp))
    return ds


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
        return _torchvision(p) if detect_layout(p) == "torchvision" else _parquet(p)
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


def _from_hf(dd, where: str) -> Dataset:
    import datasets

    out = []
    for split in ("train", "test"):
        if split not in dd:
            raise DataError(f"'{where}' has no '{split}' split; expected CIFAR-10's train and test splits")
        ds = dd[split]
        img_cols = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
        if not img_cols or "label" not in ds.features:
            raise DataError(f"'{where}' has no image + 'label' columns (found {list(ds.features)})")
        # Decode once here (PIL is fine off the training path); training only ever sees the uint8 cache.
        imgs = np.stack([np.asarray(im.convert("RGB")) for im in ds[img_cols[0]]])  # N, H, W, 3
        if imgs.shape[1:] != (32, 32, 3):
            raise DataError(f"'{where}' has {imgs.shape[1]}x{imgs.shape[2]} images; CIFAR-10 is 32x32")
        out.append(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
        out.append(torch.tensor(ds["label"], dtype=torch.int64))
    return Dataset(*out)


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
    return Dataset(tx, ty, vx, vy)


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
    return Dataset(x[tr].contiguous(), y[tr], x[te].contiguous(), y[te])


def _synthetic(n_train: int, n_test: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:])
