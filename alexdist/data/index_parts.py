"""Indexing in parts (index.py): one part per class folder, tar shard or parquet file, each checked by a reader
(index_folder.py, index_tar.py, index_parquet.py) and saved under the index's folder as parts/DIGEST.npz, where
DIGEST is what the part was made from (its files' paths, sizes and modification times). A rerun, after an
interruption or a fix, finds the parts whose files did not change and checks only the others; the parts are
then joined into one split (`assemble`)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexdist.data.index_split import SplitIndex, smallest_int
from alexdist.errors import DataError, brief

PART_VERSION = 1  # bump when a part's content changes


@dataclass(frozen=True)
class Job:
    """One part to index: picklable, sent to a worker process."""

    split: str  # "train" | "test"
    root: str  # the source folder
    key: str  # what the part covers, relative to root: a class folder, a shard, a parquet file
    label: int | None = None  # every entry's label (a class folder's), else the labels come from the data
    options: tuple = ()  # the reader's: the image extensions, the parquet columns


@dataclass
class PartInfo:
    digest: str  # 16 hex: what the part was made from
    n: int  # entries kept
    file: str  # the file the entries are read from, relative to the source (or the index, for packed bytes)
    file_size: int  # its size when indexed (0 for a class folder: each entry is a file of its own)
    corrupt: list  # [relative name, why] of each unreadable image, left out of the part


@dataclass
class Plan:
    classes: list[str] | None  # None: from the labels (0..max label)
    jobs: list[Job]
    unit: str  # what a part is, for the progress bar


def digest(job: Job, listing: list) -> str:
    text = json.dumps([PART_VERSION, job.split, job.key, list(job.options), listing], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def part_path(work: Path, key: str) -> Path:
    return work / "parts" / f"{key}.npz"


def save_part(work: Path, info: PartInfo, arrays: dict[str, np.ndarray]) -> PartInfo:
    """Write the part (its arrays and info) so that it appears whole or not at all."""
    path = part_path(work, info.digest)
    tmp = path.with_name(f".{info.digest}.tmp-{os.getpid()}.npz")
    meta = json.dumps({"n": info.n, "file": info.file, "file_size": info.file_size, "corrupt": info.corrupt})
    np.savez(tmp, info=np.array(meta), **arrays)
    os.replace(tmp, path)
    return info


def load_info(work: Path, key: str) -> PartInfo | None:
    """The info of a part already indexed, or None."""
    try:
        with np.load(part_path(work, key), allow_pickle=False) as z:
            meta = json.loads(str(z["info"]))
    except (OSError, ValueError, KeyError):  # not there, or cut short: indexed again
        return None
    return PartInfo(key, meta["n"], meta["file"], meta["file_size"], meta["corrupt"])


def names_blob(names: list[str]) -> dict[str, np.ndarray]:
    encoded = [n.encode() for n in names]
    ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
    return {"names": np.frombuffer(b"".join(encoded), dtype=np.uint8), "name_ends": ends}


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (a Slurm job's cgroup, taskset), not the node's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ignore_sigint() -> None:  # Ctrl-C is the main process's to handle: the workers finish the part they hold
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_jobs(work_fn: Callable[[Job, Path], PartInfo], jobs: list[Job], work: Path, workers: int, progress: bool,
             desc: str, unit: str) -> list[PartInfo]:
    """Each job's PartInfo, in order; with workers > 1 in that many processes (checking is file reads and header
    parsing, so processes help on a disk with latency, a network file system most), else in this one."""
    from tqdm.auto import tqdm

    out: list[PartInfo | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    images = 0

    def done(k: int, info: PartInfo) -> None:
        nonlocal images
        out[k], images = info, images + info.n
        bar.set_postfix(images=f"{images:,}", refresh=False)
        bar.update(1)

    try:
        if workers <= 1 or len(jobs) <= 1:
            for k, job in enumerate(jobs):
                done(k, work_fn(job, work))
            return out
        # spawn: the caller may hold threads (torch), which fork would copy mid-lock
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_ignore_sigint) as pool:
            futures = {pool.submit(work_fn, job, work): k for k, job in enumerate(jobs)}
            try:
                for f in as_completed(futures):
                    done(futures[f], f.result())
            except BrokenProcessPool as exc:  # a worker killed (out of memory, a crash in a decoder library)
                raise DataError(f"a process checking images died ({brief(exc)}); the parts done are kept: run again "
                                f"with one process (data.workers=0, or alexdist index --workers 0) to see which "
                                f"file it was reading") from None
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # the parts being written are finished, the rest dropped
                raise
        return out
    finally:
        bar.close()


def assemble(layout: str, source: str, file_root: str, jobs: list[Job], infos: list[PartInfo], work: Path,
             split: str) -> SplitIndex:
    """The parts of `split` joined into one SplitIndex (arrays in memory), the entries in the order of the jobs."""
    got: dict[str, list[np.ndarray]] = {k: [] for k in ("labels", "file_ids", "lengths", "offsets", "rows",
                                                         "names", "name_ends")}
    files, sizes, sources, blob_at = [], [], [], 0
    for job, info in ((j, i) for j, i in zip(jobs, infos, strict=True) if j.split == split):
        fid = len(files)
        files.append(info.file)
        sizes.append(info.file_size)
        sources.append(job.key)
        with np.load(part_path(work, info.digest), allow_pickle=False) as z:
            part = {k: z[k] for k in z.files if k != "info"}
        got["file_ids"].append(np.full(info.n, fid, dtype=np.int64))
        got["labels"].append(part.pop("labels") if job.label is None else np.full(info.n, job.label, np.int64))
        if "names" in part:
            got["name_ends"].append(part.pop("name_ends") + blob_at)
            blob_at += len(part["names"])
        for k, v in part.items():
            got[k].append(v)
    joined = {k: np.concatenate(v) if v else None for k, v in got.items()}
    empty = np.zeros(0, dtype=np.int64)
    labels = joined["labels"] if joined["labels"] is not None else empty
    return SplitIndex(
        layout, source, file_root, files, np.asarray(sizes, dtype=np.int64), labels.astype(np.int64),
        smallest_int(joined["file_ids"] if joined["file_ids"] is not None else empty),
        smallest_int(joined["lengths"] if joined["lengths"] is not None else empty, np.int32),
        offsets=joined["offsets"], names=joined["names"],
        name_ends=None if joined["name_ends"] is None else smallest_int(joined["name_ends"], np.int32),
        rows=None if joined["rows"] is None else smallest_int(joined["rows"], np.int32),
        sources=sources if layout == "parquet" else None)
