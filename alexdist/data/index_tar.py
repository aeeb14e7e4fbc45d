"""WebDataset tar shards: DIR/train-*.tar and DIR/val-*.tar (or validation-*, test-*), or DIR/train/*.tar and
DIR/val/*.tar; uncompressed tar files whose samples are members KEY.jpg (.jpeg, .png, .webp) beside KEY.cls (the
label as text), KEY being the member's path up to the first dot of its file name, as WebDataset groups them.
Each image's data offset and size in its shard come from Python's tarfile (TarInfo.offset_data), so a read is
one pread of the shard. Class names are the labels, 0..max label.

Shards are numbered (train-000000.tar, ... or train-00000-of-00064.tar): a gap in the numbers is a missing shard,
named. A shard cut short, or damaged where a member header should be (tarfile stops there silently), is named too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from alexdist.data.index_check import check_bytes
from alexdist.data.index_parts import Job, PartInfo, Plan, digest, load_info, names_blob, save_part
from alexdist.errors import DataError, brief

TEST_SPLITS = ("val", "validation", "test")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
NUMBERED = re.compile(r"^(?P<head>.*?)(?P<num>\d+)(?:-of-(?P<total>\d+))?\.tar$")
END_OF_ARCHIVE = 1024  # two zero blocks close every tar file


def shards(root: Path, split: str) -> list[Path]:
    return sorted(root.glob(f"{split}-*.tar")) or sorted((root / split).glob("*.tar"))


def is_layout(root: Path) -> bool:
    return bool(shards(root, "train"))


def plan(root: Path) -> Plan:
    test = next((s for s in TEST_SPLITS if shards(root, s)), None)
    if test is None:
        raise DataError(f"'{root}' has train shards but no val-*.tar, validation-*.tar or test-*.tar (or val/*.tar) "
                        f"for the test split; add them")
    jobs = []
    for split, name in (("train", "train"), ("test", test)):
        found = shards(root, name)
        _check_numbering(found, name)
        jobs += [Job(split, str(root), str(p.relative_to(root))) for p in found]
    return Plan(None, jobs, "shard")


def _check_numbering(found: list[Path], split: str) -> None:
    """DataError naming the first shard missing from a numbered sequence (0..max, or 0..N-1 for '-of-N')."""
    groups: dict[tuple, list[int]] = {}
    for p in found:
        m = NUMBERED.match(p.name)
        if m:
            groups.setdefault((p.parent, m["head"], len(m["num"]), m["total"]), []).append(int(m["num"]))
    for (parent, head, width, total), nums in groups.items():
        top = int(total) - 1 if total else max(nums)
        missing = sorted(set(range(top + 1)) - set(nums))
        if missing:
            tail = f"-of-{total}" if total else ""
            name = parent / f"{head}{missing[0]:0{width}d}{tail}.tar"
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"the {split} shard '{name}' is missing{more}: the shards are numbered 0..{top}; copy "
                            f"it again")


def index_part(job: Job, work: Path) -> PartInfo:
    """A shard's samples, each image checked (index_check.check_bytes); the part keeps where each image's bytes
    are, its label and member name."""
    path = Path(job.root) / job.key
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"the shard '{path}' could not be read ({brief(exc)})") from None
    key = digest(job, [st.st_size, st.st_mtime_ns])
    if (known := load_info(work, key)) is not None:
        return known
    with open(path, "rb") as fh:
        samples = _samples(fh, path, st.st_size)
        kept, corrupt = [], []
        for member, offset, size, label in samples:
            fh.seek(offset)
            why = check_bytes(fh.read(size))
            if why:
                corrupt.append([f"{job.key}/{member}", why])
            else:
                kept.append((member, offset, size, label))
    info = PartInfo(key, len(kept), job.key, st.st_size, corrupt)
    return save_part(work, info, {
        "labels": np.asarray([k[3] for k in kept], dtype=np.int64),
        "offsets": np.asarray([k[1] for k in kept], dtype=np.int64),
        "lengths": np.asarray([k[2] for k in kept], dtype=np.int64), **names_blob([k[0] for k in kept])})


def _samples(fh, path: Path, size: int) -> list[tuple[str, int, int, int]]:
    """(image member, data offset, size, label) of each sample of the shard, in order."""
    import tarfile

    images: dict[str, tuple[str, int, int]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(fileobj=fh, mode="r:") as tf:  # "r:": uncompressed only, the bytes must be pread-able
            for m in tf:
                if not m.isfile():
                    continue
                folder, _, base = m.name.rpartition("/")
                stem, _, ext = base.partition(".")
                sample = f"{folder}/{stem}" if folder else stem
                if ext.lower() in IMAGE_EXTENSIONS:
                    images.setdefault(sample, (m.name, m.offset_data, m.size))
                elif ext.lower() == "cls":
                    labels[sample] = _label(tf.extractfile(m).read(), path, m.name)
            end = tf.offset  # where the member headers stopped
    except (tarfile.TarError, EOFError) as exc:
        what = "is truncated" if "end of data" in str(exc) else "is not a readable uncompressed tar file"
        raise DataError(f"the shard '{path}' {what} ({brief(exc)}); copy it again") from None
    fh.seek(end)
    if size - end < END_OF_ARCHIVE or fh.read(END_OF_ARCHIVE).strip(b"\0"):
        raise DataError(f"the shard '{path}' is truncated or damaged at byte {end:,} of {size:,} (after "
                        f"{len(images):,} images); copy it again")
    for sample in labels.keys() - images.keys():
        raise DataError(f"the shard '{path}' has a label '{sample}.cls' with no image beside it; each sample "
                        f"needs KEY.jpg (or .jpeg, .png, .webp) and KEY.cls")
    out = []
    for sample, (member, offset, n) in images.items():
        if sample not in labels:
            raise DataError(f"the shard '{path}' has '{member}' with no '{sample}.cls' label beside it; each sample "
                            f"needs KEY.cls")
        out.append((member, offset, n, labels[sample]))
    return out


def _label(data: bytes, path: Path, member: str) -> int:
    try:
        label = int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"the shard '{path}' member '{member}' is not an integer label ({data[:20]!r}); a .cls "
                        f"member holds the class index as text") from None
    if label < 0:
        raise DataError(f"the shard '{path}' member '{member}' has label {label}; labels are 0 or more")
    return label
