"""Which path a run's data takes (data.loader): in memory when the decoded set fits, else streamed from disk.
Decided by one process (the run's rank 0) and handed to every rank: free memory differs between nodes, and ranks
that chose differently would train on different batches."""

from __future__ import annotations

import os
from pathlib import Path

from alexdist.config import AugmentConfig, DataConfig
from alexdist.data.dataset import available_memory
from alexdist.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _local_folder(source: str) -> Path | None:
    p = Path(source).expanduser()
    return p if p.is_dir() else None


def _count_folder_images(root: Path) -> int:
    """Image files under root/{train,val,test}/CLASS/ (a listing, no decoding)."""
    n = 0
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        for cls in os.scandir(root / split):
            if cls.is_dir():
                n += sum(1 for f in os.scandir(cls.path) if f.name.lower().endswith(IMAGE_EXTENSIONS))
    return n


def _count_parquet_rows(root: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_rows for f in root.rglob("*.parquet"))


def decoded_bytes(n_images: int, size: int) -> int:
    """What the in-memory path holds for `n_images` at `size` px: the decoded images plus the training batches'
    padded and mirrored copies (dataset.check_fits's figure)."""
    return 3 * n_images * 3 * size * size


def choose_loader(cfg: DataConfig, aug: AugmentConfig, processes: int) -> tuple[str, str | None]:
    """("memory" | "stream", why or None): data.loader as set, or for auto the in-memory path when every process
    on this node can hold the decoded set in 80 % of the available memory. Sources the memory path reads only
    (digits, mnist, synthetic, Hub ids, CIFAR's batches) stay in memory."""
    root = _local_folder(cfg.source)
    streamed_only = ("augment.random_resized_crop" if aug.random_resized_crop else
                     "data.eval_resize" if cfg.eval_resize is not None else None)
    if root is not None:
        from alexdist.data.index import index_file, indexable, load_index
    can_stream = root is not None and indexable(str(root))
    if cfg.loader == "stream":
        if not can_stream:
            raise ConfigError(f"data.loader=stream needs a local folder of images (train/CLASS/*, val/CLASS/*), Hub "
                              f"parquet files or WebDataset tar shards; data.source={cfg.source} is none of them; set "
                              f"data.loader=memory")
        return "stream", None
    if cfg.loader == "memory" or not can_stream:
        if streamed_only:
            raise ConfigError(f"{streamed_only} applies to streamed data only; set data.loader=stream (a local folder "
                              f"of images, parquet or tar shards), or drop {streamed_only}")
        return "memory", None
    if streamed_only:
        return "stream", f"{streamed_only} is set: streamed from disk"
    from alexdist.data.cache import cache_path

    if cache_path(cfg).is_file():
        return "memory", None
    if index_file(cfg).is_file():
        idx = load_index(cfg)
        n = len(idx.train) + len(idx.test)
    elif any(root.glob("*.tar")) or any(root.glob("*/*.tar")):
        return "stream", "WebDataset shards are read streamed"
    elif any(root.rglob("*.parquet")):
        try:
            n = _count_parquet_rows(root)
        except Exception:  # unreadable: the in-memory reader names the file and the fix in one line
            return "memory", None
    else:
        n = _count_folder_images(root)
    need, have = processes * decoded_bytes(n, cfg.image_size), available_memory()
    if need <= 0.8 * have:
        return "memory", None
    gib = 2**30
    return "stream", (f"{n:,} images at data.image_size={cfg.image_size} take {need / gib:.1f} GiB decoded for "
                      f"{processes} process(es), more than the {have / gib:.1f} GiB available: streamed from disk "
                      f"(data.loader=memory forces memory)")
