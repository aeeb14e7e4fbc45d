"""Which path a run's data takes (data.loader): in memory when the decoded set fits, else streamed from disk.
Decided by one process (the run's rank 0) and handed to every rank: free memory differs between nodes, and ranks
that chose differently would train on different batches. A resumed run takes the path its checkpoint records.
And the streamed path's loader workers per process (data.workers unset)."""

from __future__ import annotations

from pathlib import Path

from alexdist.config import AugmentConfig, DataConfig
from alexdist.data.dataset import available_memory
from alexdist.errors import ConfigError


def _local_folder(source: str) -> Path | None:
    p = Path(source).expanduser()
    return p if p.is_dir() else None


def _count_parquet_rows(root: Path) -> int:
    """The rows of the files both readers take (index_parquet.split_files): not imagenet-1k's unlabeled test."""
    import pyarrow.parquet as pq

    from alexdist.data.index_parquet import split_files

    return sum(pq.read_metadata(f).num_rows for files in split_files(root).values() for f in files)


def default_workers(processes: int) -> int:
    """data.workers when unset: the cores this process may run on (its affinity: a Slurm job's, not the node's),
    shared by the `processes` on this node, which inherit one affinity from the launcher; at most 8 (torchvision's
    references use 16 per GPU on large nodes)."""
    from alexdist.data.index_parts import available_cores

    return max(1, min(8, available_cores() // max(1, processes)))


def decoded_bytes(n_images: int, size: int) -> int:
    """What the in-memory path holds for `n_images` at `size` px: the decoded images plus the training batches'
    padded and mirrored copies (dataset.check_fits's figure)."""
    return 3 * n_images * 3 * size * size


def _cannot_stream(cfg: DataConfig) -> ConfigError:
    what = "data.loader=stream" if cfg.loader == "stream" else "the checkpoint this run resumes was streamed, which"
    fix = "set data.loader=memory" if cfg.loader == "stream" else "resume on the data it was trained on"
    return ConfigError(f"{what} needs a local folder of images (train/CLASS/*, val/CLASS/*), Hub parquet files or "
                       f"WebDataset tar shards; data.source={cfg.source} is none of them; {fix}")


def choose_loader(cfg: DataConfig, aug: AugmentConfig, processes: int,
                  resumed: str | None = None) -> tuple[str, str | None]:
    """("memory" | "stream", why or None): data.loader as set; for auto the path of the checkpoint a resume
    continues (`resumed`: re-deciding could switch paths when the estimate moves, with other workers or other free
    memory, and a switch is refused), else the in-memory path when every process on this node can hold the decoded
    set in 80 % of the available memory. Sources the memory path reads only (digits, mnist, synthetic, Hub ids,
    CIFAR's batches) stay in memory."""
    root = _local_folder(cfg.source)
    streamed_only = ("augment.random_resized_crop" if aug.random_resized_crop else
                     "data.eval_resize" if cfg.eval_resize is not None else None)
    if root is not None:
        from alexdist.data.index import index_file, indexable, load_index
    can_stream = root is not None and indexable(str(root))
    loader = resumed if cfg.loader == "auto" and resumed in ("memory", "stream") else cfg.loader
    if loader == "stream":
        if not can_stream:
            raise _cannot_stream(cfg)
        return "stream", None if cfg.loader == "stream" else "streamed from disk, as in the checkpoint it resumes"
    if loader == "memory" or not can_stream:
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
        from alexdist.data.index_folder import count_images

        n = count_images(root)  # the files the index would take, by its own listing
    need, have = processes * decoded_bytes(n, cfg.image_size), available_memory()
    if need <= 0.8 * have:
        return "memory", None
    gib = 2**30
    return "stream", (f"{n:,} images at data.image_size={cfg.image_size} take {need / gib:.1f} GiB decoded for "
                      f"{processes} process(es), more than the {have / gib:.1f} GiB available: streamed from disk "
                      f"(data.loader=memory forces memory)")
