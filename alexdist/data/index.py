"""The on-disk index of a streamed data source: for every image of the train and test splits, where its encoded
bytes are (file, offset, length) and its label, in memory-mapped numpy arrays (index_split.py), built once by
`alexdist index SOURCE` (or `build_index`) and read by every rank and node.

Sources: a local folder in one of three layouts, each read by its own module (a reader: `plan` lists the parts,
`index_part` checks one): the ImageNet folder layout (index_folder.py), WebDataset tar shards (index_tar.py) and
the Hub's parquet layout (index_parquet.py). READERS picks by what the folder holds.

Building checks every image without decoding it (index_check.py) and is done in parts (index_parts.py), saved as
they finish: a rerun checks only the parts whose files changed. The finished index is written to a new folder
(gen-FINGERPRINT-*) and published by replacing index.json in one rename, so a reader never sees half an index;
the generation it replaces is kept until the next build, and any generation for a day (a job started on it may
still be reading it). Builds take a lock (build.lock): one at a time per index.
The fingerprint changes when any indexed file's path, size or modification time, or a label, changes.

    CACHE/index/NAME-KEY/index.json       which generation is current, and a summary
                        gen-*/meta.json   classes, mean/std, each split's file table; gen-*/SPLIT.ARRAY.npy
                        parts/*.npz       the build's parts; packed/*.bin  image bytes packed from parquet files
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexdist.config import DataConfig
from alexdist.data import index_folder, index_parquet, index_tar
from alexdist.data.index_check import mean_std
from alexdist.data.index_parts import PartInfo, Plan, assemble, available_cores, run_jobs
from alexdist.data.index_split import SplitIndex, load_split, save_split
from alexdist.errors import DataError, brief
from alexdist.fileio import atomic_write_text

INDEX_VERSION = 1  # bump when the saved format changes: older indexes are then built again
# Detection order: the image folder before parquet, whose glob two folders deep would list every class folder.
READERS = {"webdataset": index_tar, "imagefolder": index_folder, "parquet": index_parquet}
LAYOUTS_HELP = ("an ImageNet-layout folder (train/CLASS/*.JPEG and val/CLASS/*), the Hub's parquet layout "
                "(train-*.parquet and validation-*.parquet or test-*.parquet) or WebDataset tar shards (train-*.tar "
                "and val-*.tar)")


@dataclass
class DataIndex:
    train: SplitIndex
    test: SplitIndex
    classes: list[str]
    fingerprint: str  # 16 hex: changes when any indexed file's (path, size, mtime) or a label changes
    layout: str  # "imagefolder" | "parquet" | "webdataset"
    skipped: int  # unreadable images left out (data.skip_corrupt)
    mean: tuple[float, float, float]  # per channel, 0..1, over a fixed sample of <= 1000 train images
    std: tuple[float, float, float]
    path: Path | None = None  # the index.json it was loaded from
    generation: str = ""  # its folder beside index.json (gen-FINGERPRINT-*)


def detect_layout(root: Path) -> str | None:
    """The layout of a local folder, or None."""
    return next((name for name, reader in READERS.items() if reader.is_layout(root)), None)


def indexable(source: str) -> bool:
    """Whether `source` is a local folder in one of the layouts an index is built from."""
    p = Path(source).expanduser()
    return p.is_dir() and detect_layout(p) is not None


def cache_root(cfg: DataConfig) -> Path:
    """data.cache_dir, else $ALEXDIST_CACHE, else ~/.cache/alexdist (where cache.py keeps decoded datasets)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("ALEXDIST_CACHE", Path.home() / ".cache" / "alexdist"))


def index_file(cfg: DataConfig) -> Path:
    """Where the index of data.source lives: CACHE/index/NAME-KEY/index.json, KEY from the folder's full path."""
    src = Path(cfg.source).expanduser().resolve()
    key = hashlib.sha256(f"{INDEX_VERSION}:{src}".encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() else "_" for c in src.name)[:40]
    return cache_root(cfg) / "index" / f"{name}-{key}" / "index.json"


def _source_root(source: str) -> tuple[Path, str]:
    p = Path(source).expanduser()
    if not p.is_dir():
        raise DataError(f"data.source '{source}' is not a local folder; an index is built from {LAYOUTS_HELP}")
    layout = detect_layout(p)
    if layout is None:
        raise DataError(f"'{p}' is in no layout an index is built from: expected {LAYOUTS_HELP}")
    return p.resolve(), layout


def build_index(cfg: DataConfig, progress: bool = True) -> DataIndex:
    """Index data.source (checking every image, in parts, resumable) and publish the index; an index whose
    files did not change since it was built is returned as it is. Workers: data.workers processes (None: the
    cores, at most 8; 0 or 1: this process). One build at a time per index (a lock): the others wait, then find
    it built."""
    root, layout = _source_root(cfg.source)
    path = index_file(cfg)
    (path.parent / "parts").mkdir(parents=True, exist_ok=True)
    with _build_lock(path.parent, progress):
        return _build_locked(cfg, root, layout, path, progress)


def _build_locked(cfg: DataConfig, root: Path, layout: str, path: Path, progress: bool) -> DataIndex:
    reader, work = READERS[layout], path.parent
    plan: Plan = reader.plan(root)
    workers = cfg.workers if cfg.workers is not None else min(8, available_cores())
    infos = run_jobs(reader.index_part, plan.jobs, work, workers, progress, f"indexing {root.name}", plan.unit)
    fingerprint = _fingerprint(layout, plan, infos)
    corrupt = [[f"{root}/{name}", why] for info in infos for name, why in info.corrupt]
    listing = _write_corrupt_list(work, corrupt)
    published = _published(path)  # read under the lock: no other build publishes until this one is done
    if published.get("fingerprint") == fingerprint and (work / published["generation"] / "meta.json").is_file():
        return load_index(cfg, published["generation"])  # nothing changed since it was built
    if corrupt and not cfg.skip_corrupt:
        raise DataError(_corrupt_message(corrupt, listing, str(root)))
    file_root = str(work) if layout == "parquet" else str(root)
    splits = {s: assemble(layout, str(root), file_root, plan.jobs, infos, work, s) for s in ("train", "test")}
    classes = _classes(plan.classes, splits, root, len(corrupt))
    stats = mean_std(splits["train"].read, len(splits["train"]))
    if stats is None:
        raise DataError(f"none of the sampled train images of '{root}' decodes (the first: "
                        f"'{splits['train'].name(0)}'); check the files")
    meta = {"version": INDEX_VERSION, "source": str(root), "layout": layout, "classes": classes,
            "fingerprint": fingerprint, "skipped": len(corrupt), "skipped_names": [n for n, _ in corrupt[:20]],
            "mean": stats[0], "std": stats[1], "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
    generation = _publish(path, meta, splits)
    _clean(work, infos, {published.get("generation"), generation})
    return load_index(cfg, generation)


@contextmanager
def _build_lock(work: Path, progress: bool) -> Iterator[None]:
    """Exclusive while held, across processes and nodes: two builds at once (an array of jobs on a new folder,
    `alexdist index` beside a job that builds) would each clean away the generation the other published. flock
    reaches other nodes on NFS (Linux maps it to a byte-range lock over NFSv4 or the lock manager) and on Lustre
    mounted with -o flock; a file system without locks (ENOLCK, ENOSYS) builds unlocked, with a warning."""
    with open(work / "build.lock", "a+") as fh:
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress:  # who holds it: a build can take hours, and a stuck one is that process to end
                    print(f"alexdist: waiting for another build of the index in '{work}' (by {_holder(fh)}); "
                          f"this one continues once it ends", file=sys.stderr, flush=True)
                fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:
            print(f"alexdist: warning: '{work}' takes no file lock ({brief(exc)}): two builds of this index at once "
                  f"would remove each other's files; build it once (alexdist index) before starting jobs",
                  file=sys.stderr, flush=True)
        _say_holder(fh, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        try:
            yield  # the lock goes with the file's closing
        finally:
            _say_holder(fh, "")  # a finished build is nobody to wait for


def _holder(fh) -> str:
    try:
        fh.seek(0)
        return fh.read().strip() or "a build that has not yet said who it is"
    except (OSError, ValueError):
        return "a build whose line could not be read"


def _say_holder(fh, line: str) -> None:
    """The lock file's one line, for a build that waits on it (best effort: it is a message, not the lock)."""
    try:
        fh.truncate(0)
        fh.write(line + "\n" if line else "")
        fh.flush()
    except OSError:
        pass


def _fingerprint(layout: str, plan: Plan, infos: list[PartInfo]) -> str:
    parts = [[job.split, job.key, info.digest] for job, info in zip(plan.jobs, infos, strict=True)]
    text = json.dumps([INDEX_VERSION, layout, plan.classes, parts], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_corrupt_list(work: Path, corrupt: list) -> Path:
    listing = work / "unreadable.txt"
    if corrupt:
        atomic_write_text(listing, "".join(f"{name}\t{why}\n" for name, why in corrupt))
    else:
        listing.unlink(missing_ok=True)
    return listing


def _corrupt_message(corrupt: list, listing: Path, source: str) -> str:
    shown = "; ".join(f"'{name}' ({why})" for name, why in corrupt[:3])
    more = f" and {len(corrupt) - 3} more" if len(corrupt) > 3 else ""
    return (f"{len(corrupt)} unreadable image{'s' if len(corrupt) > 1 else ''}: {shown}{more} (all listed in "
            f"'{listing}'); fix or remove them and index again, or set data.skip_corrupt=true (alexdist index "
            f"{source} --skip-corrupt) to skip such files")


def _classes(names: list[str] | None, splits: dict[str, SplitIndex], root: Path, skipped: int) -> list[str]:
    """The class names (given, else 0..max label); DataError for an empty split or a label out of range."""
    for split, s in splits.items():
        if not len(s):
            left = f" after leaving out {skipped} unreadable images" if skipped else ""
            raise DataError(f"the {split} split of '{root}' has no images{left}; both train and test are needed")
    k = len(names) if names else 1 + max(int(s.labels.max()) for s in splits.values())
    for split, s in splits.items():
        bad = np.flatnonzero((s.labels < 0) | (s.labels >= k))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"'{s.name(i)}' ({split}) has label {int(s.labels[i])}, outside the {k} classes "
                            f"0..{k - 1}; an unlabeled split (label -1, such as imagenet-1k's test) cannot be the "
                            f"test split: give a labeled validation split")
    return list(names) if names else [str(i) for i in range(k)]


def _published(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _publish(path: Path, meta: dict, splits: dict[str, SplitIndex]) -> str:
    """Write the index to a new generation folder, then point index.json at it in one rename; the folder's name."""
    work = path.parent
    gen = work / f"gen-{meta['fingerprint']}-{secrets.token_hex(3)}"
    tmp = work / f".{gen.name}.tmp"
    tmp.mkdir()
    try:
        meta["splits"] = {name: save_split(s, tmp, name, work) for name, s in splits.items()}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.rename(tmp, gen)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {k: meta[k] for k in ("version", "source", "layout", "fingerprint", "skipped", "built")}
    entries = {name: len(s) for name, s in splits.items()}
    atomic_write_text(path, json.dumps({"generation": gen.name, **summary, "entries": entries}, indent=1) + "\n")
    return gen.name


LEASE_S = 86400  # a generation published less than this ago stays, whichever build replaced it


def _clean(work: Path, infos: list[PartInfo], generations: set[str | None]) -> None:
    """Remove what neither the next build nor a running job reads: generations other than `generations` (the one
    just published and the one it replaced) published over a day ago, parts no longer used (a changed class
    folder's old part, ...), packed files no kept generation reads, and temporaries left by an interrupted build
    over a day ago. Called under the build lock.

    The replaced generation stays because a job started before this build reads it, its packed files included,
    and not only through pages already mapped (which outlive an unlink): each loader worker opens the arrays and
    files again by path (a split pickles as where it lies). Younger ones stay too (a lease): a job may have opened
    one a few builds ago, or between two quick rebuilds. The older ones go: a job still reading them has outlived
    two builds and a day (index ahead of jobs, not during them)."""
    day_ago = time.time() - LEASE_S
    kept = {g for g in generations if g} | {g.name for g in work.glob("gen-*") if _mtime(g) >= day_ago}
    packed = {i.digest for i in infos}
    for name in kept:
        packed |= {Path(f).stem for f in _packed_files(work / name)}
    for old in work.glob("gen-*"):
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    for folder, keep in (("parts", {i.digest for i in infos}), ("packed", packed)):
        for f in (work / folder).iterdir() if (work / folder).is_dir() else ():
            if f.stem not in keep if not f.name.startswith(".") else _mtime(f) < day_ago:
                f.unlink(missing_ok=True)
    for tmp in work.glob(".gen-*.tmp"):  # an interrupted publish's
        if _mtime(tmp) < day_ago:
            shutil.rmtree(tmp, ignore_errors=True)


def _packed_files(gen: Path) -> list[str]:
    """The packed files (packed/DIGEST.bin) a generation's splits read; none for a folder or shards."""
    try:
        splits = json.loads((gen / "meta.json").read_text())["splits"].values()
    except (OSError, ValueError, KeyError):
        return []
    return [f for s in splits if s.get("file_root") is None for f in s["files"] if f.startswith("packed/")]


def _mtime(f: Path) -> float:
    try:
        return f.stat().st_mtime
    except OSError:  # removed meanwhile
        return float("inf")


def load_index(cfg: DataConfig, generation: str | None = None) -> DataIndex:
    """The published index of data.source, or its generation `generation` (the one another rank loaded), its
    arrays memory-mapped (shared pages across loader workers)."""
    path, named = index_file(cfg), generation is not None
    if not named:
        pointer = _published(path)
        if not pointer:
            raise DataError(f"'{cfg.source}' has no index yet (looked for '{path}'); build it once, before training: "
                            f"alexdist index {cfg.source}" + (f" --cache-dir {cfg.cache_dir}" if cfg.cache_dir else ""))
        generation = pointer["generation"]
    gen = path.parent / generation
    try:
        meta = json.loads((gen / "meta.json").read_text())
    except FileNotFoundError:
        again = "" if named else f"; build the index again: alexdist index {cfg.source}"
        raise DataError(f"the index folder '{gen}' is not there{again}") from None
    except (OSError, ValueError):
        meta = {}
    if meta.get("version") != INDEX_VERSION:
        raise DataError(f"the index '{path}' is unreadable or from another alexdist version; build it again: "
                        f"alexdist index {cfg.source}")
    if meta["skipped"] and not cfg.skip_corrupt:
        raise DataError(f"the index of '{meta['source']}' leaves out {meta['skipped']} unreadable images (the "
                        f"first: '{meta['skipped_names'][0]}'); set data.skip_corrupt=true to train without them, "
                        f"or fix them and index again (alexdist index {cfg.source})")
    return DataIndex(load_split(str(gen), "train"), load_split(str(gen), "test"), meta["classes"],
                     meta["fingerprint"], meta["layout"], meta["skipped"], tuple(meta["mean"]), tuple(meta["std"]),
                     path, generation)
