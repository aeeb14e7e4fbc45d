"""One split of an on-disk index (index.py): where each entry's encoded bytes are and its label, in numpy arrays
only, saved as one .npy file per array and loaded memory-mapped, so loader worker processes share the pages
(a list of Python objects per entry would be copied into each worker as reference counts are written).

Reads are one os.pread each: a whole file (the image-folder layout), or a range of a larger file (a tar shard;
the bytes packed from parquet files). A file that is gone or whose size differs from the size it had when indexed
is a DataError naming it: the data changed since it was indexed.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alexdist.errors import DataError, brief

ARRAYS = ("labels", "file_ids", "lengths", "offsets", "names", "name_ends", "rows")
MAX_OPEN_FILES = 64  # shards kept open per process (ImageNet's parquet files pack to ~1,300: more than a ulimit)


@dataclass
class SplitIndex:
    layout: str  # "imagefolder" | "parquet" | "webdataset"
    source: str  # the source folder, for messages
    file_root: str  # the folder `files` are relative to: the source, or the index for bytes packed from parquet
    files: list[str]  # imagefolder: class folders; webdataset: shards; parquet: packed files
    file_sizes: np.ndarray  # int64 (F,): each file's size when indexed (shards and packed files; 0 for folders)
    labels: np.ndarray  # int64 (N,)
    file_ids: np.ndarray  # (N,) index into `files`
    lengths: np.ndarray  # (N,) bytes of each entry (imagefolder: the file's size when indexed)
    offsets: np.ndarray | None = None  # int64 (N,): where the entry starts in its file; None: whole files
    names: np.ndarray | None = None  # uint8 blob: each entry's file relative to its class folder, or tar member
    name_ends: np.ndarray | None = None  # (N,) where each name ends in `names` (it starts where the previous ends)
    rows: np.ndarray | None = None  # parquet: each entry's row in its source file
    sources: list[str] | None = None  # parquet: the source file each packed file was packed from
    origin: tuple[str, str] | None = field(default=None, repr=False, compare=False)  # (folder, split) when loaded

    def __len__(self) -> int:
        return len(self.labels)

    def __reduce_ex__(self, protocol):
        # Sent to a spawned loader worker as where it lies, so the worker maps the same pages instead of
        # receiving a copy of every array.
        if self.origin is not None:
            return (load_split, self.origin)
        return super().__reduce_ex__(protocol)

    def member(self, i: int) -> str:
        """Entry i's file relative to its class folder (imagefolder) or its tar member name."""
        start = int(self.name_ends[i - 1]) if i else 0
        return bytes(self.names[start:int(self.name_ends[i])]).decode()

    def name(self, i: int) -> str:
        """The file (and member, or row) entry i comes from, for messages."""
        fid = int(self.file_ids[i])
        if self.rows is not None:
            return f"{self.source}/{self.sources[fid]} row {int(self.rows[i])}"
        return f"{self.source}/{self.files[fid]}/{self.member(i)}"

    def read(self, i: int) -> bytes:
        """The encoded image bytes of entry i."""
        fid, n = int(self.file_ids[i]), int(self.lengths[i])
        path = os.path.join(self.file_root, self.files[fid])
        if self.offsets is None:
            return self._read_file(os.path.join(path, self.member(i)), n)
        return self._read_range(path, int(self.file_sizes[fid]), int(self.offsets[i]), n)

    def _read_file(self, path: str, size: int) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DataError(self._gone(path)) from None
        except OSError as exc:
            raise DataError(f"'{path}' could not be opened ({brief(exc)})") from None
        try:
            now = os.fstat(fd).st_size
            if now != size:
                raise DataError(self._changed(path, size, now))
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

    def _read_range(self, path: str, file_size: int, offset: int, n: int) -> bytes:
        try:
            fd = _open_cached(path)
        except FileNotFoundError:
            raise DataError(self._gone(path)) from None
        except OSError as exc:
            raise DataError(f"'{path}' could not be opened ({brief(exc)})") from None
        st = os.fstat(fd)
        if st.st_nlink == 0:  # deleted or replaced since this process opened it
            _forget(path)
            raise DataError(self._gone(path))
        if st.st_size != file_size:
            raise DataError(self._changed(path, file_size, st.st_size))
        return os.pread(fd, n, offset)

    def _gone(self, path: str) -> str:
        return (f"'{path}' was indexed but is gone; restore it, or index the data again (alexdist index "
                f"{self.source}): a run resumed on changed data is refused")

    def _changed(self, path: str, size: int, now: int) -> str:
        return (f"'{path}' changed since it was indexed ({now:,} bytes, indexed at {size:,}); index the data again "
                f"(alexdist index {self.source}): a run resumed on changed data is refused")


# Open shards, per process (a forked worker's inherited descriptors stay valid: pread uses no file position).
_OPEN: OrderedDict[str, int] = OrderedDict()
_LOCK = threading.Lock()


def _open_cached(path: str) -> int:
    with _LOCK:
        fd = _OPEN.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            while len(_OPEN) >= MAX_OPEN_FILES:
                os.close(_OPEN.popitem(last=False)[1])
        _OPEN[path] = fd
        return fd


def _forget(path: str) -> None:
    with _LOCK:
        fd = _OPEN.pop(path, None)
    if fd is not None:
        os.close(fd)


def save_split(split: SplitIndex, folder: Path, name: str, index_dir: Path) -> dict:
    """Write split's arrays as folder/NAME.ARRAY.npy; return the rest, for the index's meta.json."""
    for key in ARRAYS:
        arr = getattr(split, key)
        if arr is not None:
            np.save(folder / f"{name}.{key}.npy", np.ascontiguousarray(arr), allow_pickle=False)
    packed = Path(split.file_root) == index_dir
    return {"layout": split.layout, "source": split.source, "file_root": None if packed else split.file_root,
            "files": split.files, "file_sizes": [int(s) for s in split.file_sizes], "sources": split.sources,
            "arrays": [k for k in ARRAYS if getattr(split, k) is not None], "entries": len(split)}


def load_split(folder: str, name: str) -> SplitIndex:
    """The split NAME of the index generation in `folder`, its arrays memory-mapped."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())["splits"][name]
        arrays = {k: np.load(Path(folder) / f"{name}.{k}.npy", mmap_mode="r", allow_pickle=False)
                  for k in meta["arrays"]}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"the index '{folder}' is unreadable or was replaced while in use ({brief(exc)}); index "
                        f"the data again (alexdist index SOURCE)") from None
    root = meta["file_root"] or str(Path(folder).parent)
    return SplitIndex(meta["layout"], meta["source"], root, meta["files"],
                      np.asarray(meta["file_sizes"], dtype=np.int64), sources=meta["sources"],
                      origin=(str(folder), name), **arrays)


def smallest_int(values: np.ndarray, at_least: type = np.int16) -> np.ndarray:
    """values in the smallest of int16/int32/int64 (not below `at_least`) that holds them: the per-entry arrays
    dominate the index's size."""
    top = int(values.max()) if len(values) else 0
    low = int(values.min()) if len(values) else 0
    for dtype in (np.int16, np.int32, np.int64):
        if np.dtype(dtype).itemsize >= np.dtype(at_least).itemsize and np.iinfo(dtype).min <= low and \
                top <= np.iinfo(dtype).max:
            return values.astype(dtype, copy=False)
    return values.astype(np.int64, copy=False)
