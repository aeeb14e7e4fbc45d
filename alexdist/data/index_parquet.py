"""The Hub's parquet layout for image classification: DIR/**/train-*.parquet and validation-*.parquet (or val-*,
test-*; two folders deep at most, as `hf download` writes them), an image column ({'bytes', 'path'} records, or
plain binary) and a label column. imagenet-1k's test split is unlabeled (label -1): with a validation split it is
ignored, as validation is alexdist's test split. Class names come from the label's ClassLabel feature in the
files' Hub metadata, else 0..max label.

The image bytes are packed once into plain files under the index's folder (packed/DIGEST.bin, one per parquet
file), because a parquet column chunk is compressed and encoded: reading one sample means decoding its page, not
a pread of its bytes. Packing streams the file a batch of rows at a time with pyarrow, never the whole file in
memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from alexdist.data.index_check import check_bytes
from alexdist.data.index_parts import Job, PartInfo, Plan, digest, load_info, save_part
from alexdist.errors import DataError, brief

TEST_SPLITS = ("validation", "val", "test")
LABEL_COLUMNS = ("label", "fine_label", "labels")  # as sources.py: CIFAR-10's, CIFAR-100's fine labels, others'
ROWS_PER_BATCH = 64


def files(root: Path, split: str) -> list[Path]:
    found = set()
    for pattern in (f"{split}-*.parquet", f"*/{split}-*.parquet", f"*/*/{split}-*.parquet"):
        found.update(root.glob(pattern))
    return sorted(found)


def split_files(root: Path) -> dict[str, list[Path]]:
    """The files of alexdist's train and test splits: train-*, and for test the first of validation-*, val-*,
    test-* found (imagenet-1k's unlabeled test split is then ignored). The rule of both readers, this index and
    the in-memory one (sources.py), so that either path reads the same images."""
    test = next((found for s in TEST_SPLITS if (found := files(root, s))), [])
    return {"train": files(root, "train"), "test": test}


def is_layout(root: Path) -> bool:
    return bool(files(root, "train"))


def plan(root: Path) -> Plan:
    chosen = split_files(root)
    if not chosen["test"]:
        raise DataError(f"'{root}' has train-*.parquet but no validation-*.parquet or test-*.parquet for the test "
                        f"split; add them")
    jobs, classes = [], None
    for split, found in chosen.items():
        schema = _schema(found[0])
        image, label = _columns(schema, found[0], split == "train")
        if split == "train":
            classes = _class_names(schema, label)
        jobs += [Job(split, str(root), str(p.relative_to(root)), None, (image, label)) for p in found]
    return Plan(classes, jobs, "parquet file")


def _schema(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except Exception as exc:
        raise DataError(f"'{path}' is not a readable parquet file ({brief(exc)}); download it again") from None


def _columns(schema, path: Path, need_label: bool) -> tuple[str, str]:
    """(image column, label column or '') of a parquet schema."""
    import pyarrow as pa

    def is_image(f) -> bool:
        if pa.types.is_struct(f.type):
            return any(f.type.field(i).name == "bytes" for i in range(f.type.num_fields))
        return pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)

    image = next((f.name for f in schema if is_image(f)), None)
    label = next((c for c in LABEL_COLUMNS if c in schema.names), "")
    if image is None or (need_label and not label):
        raise DataError(f"'{path}' has no image + label columns (found {', '.join(schema.names)}); expected image "
                        f"records {{'bytes', 'path'}} and one of {', '.join(LABEL_COLUMNS)}")
    return image, label


def _class_names(schema, label: str) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        names = json.loads(meta)["info"]["features"][label]["names"]
    except (TypeError, ValueError, KeyError):  # no Hub metadata, or the label is no ClassLabel
        return None
    return [str(n) for n in names] if names else None


def index_part(job: Job, work: Path) -> PartInfo:
    """A parquet file's rows, each image checked (index_check.check_bytes) and the good ones appended to a packed
    file; the part keeps each one's offset, size, label and row."""
    import pyarrow.parquet as pq

    path = Path(job.root) / job.key
    try:
        st = os.stat(path)
    except OSError as exc:  # gone or unreadable since the plan listed it
        raise DataError(f"'{path}' could not be read ({exc.strerror or brief(exc)}); restore it (or make it "
                        f"readable) and index again") from None
    key = digest(job, [st.st_size, st.st_mtime_ns])
    if (known := load_info(work, key)) is not None:
        return known
    packed = work / "packed" / f"{key}.bin"
    packed.parent.mkdir(exist_ok=True)
    tmp = packed.with_name(f".{key}.tmp-{os.getpid()}.bin")
    got: dict[str, list[int]] = {"offsets": [], "lengths": [], "labels": [], "rows": []}
    corrupt, row = [], 0
    try:
        with open(tmp, "wb") as out:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_BATCH, columns=_wanted(job)):
                for data, label in zip(_image_bytes(batch.column(0)), _labels(batch, job), strict=True):
                    why = "no image bytes" if data is None else check_bytes(data)
                    if why:
                        corrupt.append([f"{job.key} row {row}", why])
                    else:
                        for k, v in zip(got, (out.tell(), len(data), label, row), strict=True):
                            got[k].append(v)
                        out.write(data)
                    row += 1
        os.replace(tmp, packed)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"'{path}' could not be read at row {row} ({brief(exc)}); download it again") from None
    info = PartInfo(key, len(got["rows"]), f"packed/{key}.bin", packed.stat().st_size, corrupt)
    return save_part(work, info, {k: np.asarray(v, dtype=np.int64) for k, v in got.items()})


def _wanted(job: Job) -> list[str]:
    image, label = job.options
    return [image, label] if label else [image]


def _image_bytes(column) -> list:
    import pyarrow as pa

    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def _labels(batch, job: Job) -> np.ndarray:
    if batch.num_columns < 2:  # an unlabeled split: -1, refused if it is the one used
        return np.full(batch.num_rows, -1, dtype=np.int64)
    return batch.column(1).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
