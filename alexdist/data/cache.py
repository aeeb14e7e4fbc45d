"""The decoded dataset cached on disk: one safetensors file per source (no pickle, memory-mapped, loads in
milliseconds), keyed by what could change the decoded content. A cache that fails to load is rebuilt, never
trusted."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from alexdist.config import DataConfig
from alexdist.data.dataset import Dataset, check_labels
from alexdist.data.sources import decode_source, mnist_file
from alexdist.fileio import atomic_path

CACHE_VERSION = 3  # bump when the decoded format changes (2: class names; 3: one test-split rule)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("ALEXDIST_CACHE", Path.home() / ".cache" / "alexdist"))


def _source_key(cfg: DataConfig) -> str:
    """A cache key that changes when the source's content may have changed."""
    src = cfg.source
    if src == "synthetic":
        ident = f"synthetic:{cfg.synthetic_train}:{cfg.synthetic_test}"
    elif src == "digits":
        ident = "digits"
    elif src == "mnist":
        ident = f"mnist-256:{mnist_file()}"  # pixels = floats x 256
    elif Path(src).exists():
        p = Path(src).resolve()
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        ident = "local:" + "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    else:
        ident = f"hub:{src}:{cfg.revision}"
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{ident}:{cfg.image_size}px".encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() else "_" for c in Path(src).name or src)[:40]
    return f"{name}-{digest}"


def cache_path(cfg: DataConfig) -> Path:
    root = Path(cfg.cache_dir) if cfg.cache_dir else _default_cache_dir()
    return root / f"{_source_key(cfg)}.safetensors"


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
    if ds.resized:
        n = len(ds.train_y) + len(ds.test_y)
        print(f"alexdist: resized {ds.resized} of {n} images to {cfg.image_size}x{cfg.image_size} (antialiased "
              f"bilinear, train and test alike); the cache keeps them at that size", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in ds.tensors().items()}, str(tmp),
                  metadata={"classes": json.dumps(ds.classes)})
    return ds
