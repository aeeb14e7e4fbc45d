"""The ImageNet folder layout, torchvision's ImageFolder per split: DIR/train/CLASS/*, and DIR/val/CLASS/* (or
DIR/test/CLASS/*) as alexdist's test split. Class names are the train folder's class folders, sorted, as
torchvision's `find_classes` gives them; images are the files with torchvision's IMG_EXTENSIONS, listed as its
`make_dataset` lists them (sorted, subfolders included, links followed).

An empty train class folder is refused, as torchvision's ImageFolder refuses it by default (`allow_empty=False`):
its class would be an output the model can only get wrong. A test class folder may be empty (a small test split
need not hold every class)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import numpy as np

from alexdist.data.index_check import check_image
from alexdist.data.index_parts import Job, PartInfo, Plan, digest, load_info, names_blob, save_part
from alexdist.errors import DataError, brief

TEST_FOLDERS = ("val", "test")  # ImageNet's val/ is alexdist's test split


def _class_folders(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        _unlisted(exc)


def is_layout(root: Path) -> bool:
    return bool(_class_folders(root / "train"))


def test_folder(root: Path) -> str | None:
    """The folder of alexdist's test split: the first of val/, test/ that holds class folders. The rule of both
    readers, this index and the in-memory one (imagefolder.py)."""
    return next((n for n in TEST_FOLDERS if _class_folders(root / n)), None)


def plan(root: Path) -> Plan:
    """One job per class folder of each split; a missing test split, an empty train class folder or a test class
    the train split lacks: DataError."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes  # the parent only: it imports torch

    test = test_folder(root)
    if test is None:
        flat = " (ImageNet's val/ comes flat: sort it into class folders first, as PyTorch's examples/imagenet " \
               "extract_ILSVRC.sh does)" if (root / "val").is_dir() else ""
        raise DataError(f"'{root}' has train/ but no val/ or test/ folder of class folders; an image folder needs "
                        f"train/CLASS/* and val/CLASS/* (ImageNet's layout) or test/CLASS/*{flat}")
    classes, class_to_idx = find_classes(root / "train")
    for c in classes:
        if not _has_image(root / "train" / c, IMG_EXTENSIONS):
            raise DataError(f"the class folder '{root / 'train' / c}' holds no images ({', '.join(IMG_EXTENSIONS)}); "
                            f"add its images or remove the folder (each train class folder is one of the model's "
                            f"outputs)")
    test_classes = _class_folders(root / test)
    extra = [c for c in test_classes if c not in class_to_idx]
    if extra:
        raise DataError(f"'{root / test}' has class folders the train split lacks ({', '.join(extra[:5])}"
                        f"{', ...' if len(extra) > 5 else ''}); every {test} class must be a train class")
    jobs = [Job("train", str(root), f"train/{c}", i, IMG_EXTENSIONS) for i, c in enumerate(classes)]
    jobs += [Job("test", str(root), f"{test}/{c}", class_to_idx[c], IMG_EXTENSIONS) for c in test_classes]
    return Plan(classes, jobs, "class folder")


def _unlisted(exc: OSError) -> NoReturn:
    """os.walk's onerror: a folder it cannot list (permissions, gone meanwhile) is refused, not skipped in silence
    (its images would be missing from the index without a word)."""
    raise DataError(f"the folder '{exc.filename}' could not be listed ({exc.strerror or brief(exc)}); make it "
                    f"readable (or remove it) and index again")


def _has_image(folder: Path, extensions: tuple[str, ...]) -> bool:
    walk = os.walk(folder, onerror=_unlisted, followlinks=True)
    return any(f.lower().endswith(extensions) for _, _, files in walk for f in files)


def list_images(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """The images of a class folder relative to it, as torchvision's make_dataset lists them (sorted os.walk,
    links followed, by extension, case-insensitive). Written out rather than called: make_dataset imports torch
    in each worker process and returns full paths of a whole split at once."""
    out, base = [], len(str(folder)) + 1
    for where, _, files in sorted(os.walk(folder, onerror=_unlisted, followlinks=True)):
        sub = where[base:]
        out += [f"{sub}/{f}" if sub else f for f in sorted(files) if f.lower().endswith(extensions)]
    return out


def count_images(root: Path) -> int:
    """The images an index of this folder takes (train/CLASS/ and the test folder's class folders, subfolders
    included), by the same listing, without checking them: data.loader=auto's estimate (choice.py)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    test = test_folder(root)
    folders = [root / "train" / c for c in _class_folders(root / "train")]
    folders += [root / test / c for c in _class_folders(root / test)] if test else []
    return sum(len(list_images(f, IMG_EXTENSIONS)) for f in folders)


def index_part(job: Job, work: Path) -> PartInfo:
    """A class folder's images, each checked (index_check.check_image); the part keeps their names and sizes."""
    folder = os.path.join(job.root, job.key)  # str paths: a Path per file costs more than the stat
    names = list_images(Path(folder), job.options)
    stats = []
    for n in names:
        try:
            st = os.stat(os.path.join(folder, n))
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:  # gone (or a dangling link) since the listing: unreadable, reported as such
            stats.append((-1, 0))
    key = digest(job, [[n, s, t] for n, (s, t) in zip(names, stats, strict=True)])
    if (known := load_info(work, key)) is not None:
        return known
    kept, sizes, corrupt = [], [], []
    for n, (size, _) in zip(names, stats, strict=True):
        why = _check_file(os.path.join(folder, n)) if size >= 0 else "missing"
        if why:
            corrupt.append([f"{job.key}/{n}", why])
        else:
            kept.append(n)
            sizes.append(size)
    info = PartInfo(key, len(kept), job.key, 0, corrupt)
    return save_part(work, info, {"lengths": np.asarray(sizes, dtype=np.int64), **names_blob(kept)})


def _check_file(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return check_image(fh)
    except OSError as exc:
        return brief(exc)
