"""The on-disk index of a streamed source (alexdist/data/index.py), on small sets written here in the real layouts:
an ImageNet-layout folder of JPEGs, the Hub's parquet files, WebDataset tar shards. Each indexes to the same
labels and bytes; bad files are found while indexing and named in one line; reads refuse files changed since;
a build resumes from its parts; the fingerprint follows the files."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from alexdist.config import DataConfig
from alexdist.data import index_folder
from alexdist.data.index import build_index, index_file, indexable, load_index
from alexdist.errors import DataError

CLASSES = ["cat", "dog", "fox"]


def jpeg(seed: int, size=(20, 14), mode="RGB", fmt="JPEG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def samples(split: str) -> list[tuple[str, int, bytes]]:
    """(name, label, bytes): 3 train and 2 test images per class, class-major, names sorted."""
    per = 3 if split == "train" else 2
    return [(f"{c}_{k}", label, jpeg(100 * label + k + (50 if split != "train" else 0)))
            for label, c in enumerate(CLASSES) for k in range(per)]


def write_folder(root: Path) -> Path:
    for split, folder in (("train", "train"), ("test", "val")):
        for name, label, data in samples(split):
            (root / folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
            (root / folder / CLASSES[label] / f"{name}.JPEG").write_bytes(data)
    return root


def write_parquet(root: Path, with_validation: bool = True) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = {"info": {"features": {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": CLASSES}}}}
    (root / "data").mkdir(parents=True)
    splits = [("train", "train"), ("validation", "test")] if with_validation else [("train", "train")]
    for name, split in splits + [("test", None)]:  # imagenet-1k's unlabeled test split: label -1
        rows = samples(split or "test")
        table = pa.table({"image": [{"bytes": d, "path": f"{n}.JPEG"} for n, _, d in rows],
                          "label": [lab if split else -1 for _, lab, _ in rows]})
        table = table.replace_schema_metadata({"huggingface": json.dumps(hub)})
        pq.write_table(table, root / "data" / f"{name}-00000-of-00001.parquet", row_group_size=4)
    return root


def write_shards(root: Path, per_shard: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "val")):
        rows = samples(split)
        for s in range(0, len(rows), per_shard):
            with tarfile.open(root / f"{prefix}-{s // per_shard:06d}.tar", "w") as tf:
                for name, label, data in rows[s:s + per_shard]:
                    for member, payload in ((f"{name}.jpg", data), (f"{name}.cls", str(label).encode())):
                        info = tarfile.TarInfo(member)
                        info.size = len(payload)
                        tf.addfile(info, io.BytesIO(payload))
    return root


def cfg(source: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), workers=0, **kw)


def entries(split) -> list[tuple[int, bytes]]:
    return [(int(split.labels[i]), split.read(i)) for i in range(len(split))]


def test_each_layout_indexes_to_the_same_labels_and_bytes(tmp_path):
    made = {"imagefolder": write_folder(tmp_path / "folder"), "parquet": write_parquet(tmp_path / "pq"),
            "webdataset": write_shards(tmp_path / "wds")}
    want = {s: [(lab, d) for _, lab, d in samples(s)] for s in ("train", "test")}
    for layout, root in made.items():
        assert indexable(str(root))
        idx = build_index(cfg(root, tmp_path), progress=False)
        assert idx.layout == layout and idx.skipped == 0 and len(idx.fingerprint) == 16
        assert entries(idx.train) == want["train"] and entries(idx.test) == want["test"]  # parquet's test ignored
        assert idx.classes == (["0", "1", "2"] if layout == "webdataset" else CLASSES)
        assert all(0 < m < 1 for m in idx.mean) and all(0 < s < 1 for s in idx.std)
        again = load_index(cfg(root, tmp_path))
        assert isinstance(again.train.labels, np.memmap) and again.train.labels.dtype == np.int64
        assert entries(again.test) == want["test"] and again.mean == idx.mean
    names = {layout: load_index(cfg(root, tmp_path)).train.name(4) for layout, root in made.items()}
    assert names["imagefolder"].endswith("folder/train/dog/dog_1.JPEG")
    assert names["parquet"].endswith("data/train-00000-of-00001.parquet row 4")
    assert names["webdataset"].endswith("wds/train-000001.tar/dog_1.jpg")
    assert not indexable(str(tmp_path / "cache")) and not indexable("uoft-cs/cifar10")


def test_unreadable_and_truncated_jpegs_are_named_in_one_line_and_skipped_with_skip_corrupt(tmp_path):
    root = write_folder(tmp_path / "folder")
    bad = root / "train" / "dog" / "zz_random.JPEG"
    bad.write_bytes(os.urandom(3000))
    cut = root / "train" / "fox" / "zz_cut.JPEG"
    whole = jpeg(7, size=(64, 64))
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(DataError) as err:
        build_index(cfg(root, tmp_path), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("2 unreadable images")
    assert str(bad) in msg and str(cut) in msg and "truncated" in msg and "data.skip_corrupt=true" in msg
    idx = build_index(cfg(root, tmp_path, skip_corrupt=True), progress=False)
    assert idx.skipped == 2 and len(idx.train) == 9
    with pytest.raises(DataError, match="leaves out 2 unreadable images.*data.skip_corrupt=true"):
        load_index(cfg(root, tmp_path))


def test_cmyk_grayscale_palette_and_png_named_jpeg_files_are_accepted(tmp_path):
    root = write_folder(tmp_path / "folder")
    odd = {"cmyk.JPEG": jpeg(1, mode="CMYK"), "gray.JPEG": jpeg(2, mode="L"),
           "palette.JPEG": jpeg(3, mode="P", fmt="PNG"), "png.JPEG": jpeg(4, fmt="PNG")}
    for name, data in odd.items():
        (root / "train" / "cat" / name).write_bytes(data)
    idx = build_index(cfg(root, tmp_path), progress=False)
    assert idx.skipped == 0 and len(idx.train) == 9 + 4
    assert {idx.train.read(i) for i in range(len(idx.train))} >= set(odd.values())


def test_an_empty_train_class_folder_is_refused_and_an_empty_test_class_folder_is_not(tmp_path):
    root = write_folder(tmp_path / "folder")
    (root / "val" / "cat").rename(tmp_path / "moved")
    (root / "val" / "cat").mkdir()
    idx = build_index(cfg(root, tmp_path), progress=False)
    assert len(idx.test) == 4 and idx.classes == CLASSES
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"the class folder '.*train/emu' holds no images \(\.jpg"):
        build_index(cfg(root, tmp_path), progress=False)


def test_a_missing_or_truncated_shard_is_named(tmp_path):
    root = write_shards(tmp_path / "wds", per_shard=3)  # train-000000..000002
    shard = root / "train-000001.tar"
    kept = shard.read_bytes()
    shard.unlink()
    with pytest.raises(DataError, match=r"the train shard '.*wds/train-000001.tar' is missing"):
        build_index(cfg(root, tmp_path), progress=False)
    for cut in (len(kept) // 2, 1536):  # inside a member's data; at a member's boundary
        shard.write_bytes(kept[:cut])
        with pytest.raises(DataError, match=r"the shard '.*wds/train-000001.tar' is truncated") as err:
            build_index(cfg(root, tmp_path), progress=False)
        assert "\n" not in str(err.value)


def test_read_refuses_a_file_changed_or_gone_since_indexing(tmp_path):
    root = write_folder(tmp_path / "folder")
    idx = build_index(cfg(root, tmp_path), progress=False)
    f = root / "train" / "cat" / "cat_1.JPEG"
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"'.*train/cat/cat_1.JPEG' changed since it was indexed"):
        idx.train.read(1)
    f.unlink()
    with pytest.raises(DataError, match=r"'.*train/cat/cat_1.JPEG' was indexed but is gone"):
        idx.train.read(1)
    assert idx.train.read(2)  # the others still read
    shards = write_shards(tmp_path / "wds")
    sidx = build_index(cfg(shards, tmp_path), progress=False)
    assert sidx.train.read(0)
    with open(shards / "train-000000.tar", "ab") as fh:
        fh.write(b"\0" * 512)
    with pytest.raises(DataError, match=r"'.*wds/train-000000.tar' changed since it was indexed"):
        sidx.train.read(1)


def test_a_rerun_after_an_interrupted_build_checks_only_the_parts_not_done(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "folder")
    real, checked = index_folder.check_image, []

    def interrupted(fh):
        if "/dog/" in fh.name:
            raise KeyboardInterrupt
        checked.append(fh.name)
        return real(fh)

    monkeypatch.setattr(index_folder, "check_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(cfg(root, tmp_path), progress=False)
    assert not index_file(cfg(root, tmp_path)).exists() and len(checked) == 3  # train/cat's part was saved

    def counted(fh):
        checked.append(fh.name)
        return real(fh)

    checked.clear()
    monkeypatch.setattr(index_folder, "check_image", counted)
    idx = build_index(cfg(root, tmp_path), progress=False)
    assert len(idx.train) == 9 and not any("/train/cat/" in n for n in checked) and len(checked) == 6 + 6


def test_the_fingerprint_changes_when_a_file_or_a_label_changes_and_not_otherwise(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "folder")
    first = build_index(cfg(root, tmp_path), progress=False).fingerprint
    monkeypatch.setattr(index_folder, "check_image", lambda fh: pytest.fail("an unchanged part checked again"))
    assert build_index(cfg(root, tmp_path), progress=False).fingerprint == first
    monkeypatch.undo()
    f = root / "val" / "dog" / "dog_0.JPEG"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    touched = build_index(cfg(root, tmp_path), progress=False).fingerprint
    f.rename(root / "val" / "fox" / "dog_0.JPEG")  # same file, another label
    moved = build_index(cfg(root, tmp_path), progress=False)
    assert len({first, touched, moved.fingerprint}) == 3
    assert load_index(cfg(root, tmp_path)).fingerprint == moved.fingerprint


def test_a_split_pickles_as_where_it_lies_not_as_its_arrays(tmp_path):
    root = write_folder(tmp_path / "folder")
    idx = build_index(cfg(root, tmp_path), progress=False)
    blob = pickle.dumps(idx.train)
    assert len(blob) < 300  # a loader worker maps the same pages instead of receiving a copy
    back = pickle.loads(blob)
    assert entries(back) == entries(idx.train) and isinstance(back.lengths, np.memmap)


def test_an_unlabeled_parquet_test_split_without_validation_is_refused(tmp_path):
    root = write_parquet(tmp_path / "pq", with_validation=False)
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet row 0' \(test\) has label -1.*validation"):
        build_index(cfg(root, tmp_path), progress=False)


def test_alexdist_index_prints_one_summary_line(tmp_path, capsys):
    from alexdist import cli

    root = write_folder(tmp_path / "folder")
    assert cli.main(["index", str(root), "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--quiet"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "(imagefolder): train 9 and test 6 images, 3 classes; index " in out
    assert cli.main(["index", str(tmp_path / "nowhere"), "--quiet"]) == 3
    assert "is not a local folder" in capsys.readouterr().err


def test_the_in_memory_reader_and_the_index_take_the_same_parquet_test_split(tmp_path):
    """imagenet-1k's files: train, validation and an unlabeled test. Both paths evaluate on validation, so a set
    that moves between them (data.loader) keeps its test split; the size auto weighs counts those files only."""
    from alexdist.data.choice import _count_parquet_rows
    from alexdist.data.sources import decode_source

    root = write_parquet(tmp_path / "pq")
    idx = build_index(cfg(root, tmp_path), progress=False)
    memory = decode_source(DataConfig(source=str(root), image_size=16))
    assert memory.test_y.tolist() == idx.test.labels.tolist() == [lab for _, lab, _ in samples("test")]
    assert memory.train_y.tolist() == idx.train.labels.tolist()
    assert _count_parquet_rows(root) == len(idx.train) + len(idx.test) == 15


def test_a_rebuild_keeps_the_generations_jobs_may_read_and_drops_those_over_a_day_old(tmp_path):
    """A job reads the generation it opened, its packed bytes too, through loader workers that open them again by
    path: rebuilds while it runs (a parquet file replaced, twice within the day) must leave them; a rebuild once
    they are over a day old and replaced drops them."""
    root = write_parquet(tmp_path / "pq")
    first = build_index(cfg(root, tmp_path), progress=False)
    worker_copy = pickle.dumps(first.train)  # what a loader worker receives
    train_file = root / "data" / "train-00000-of-00001.parquet"
    work = index_file(cfg(root, tmp_path)).parent

    def rebuild():
        st = train_file.stat()
        os.utime(train_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new packed file at each build
        return build_index(cfg(root, tmp_path), progress=False)

    assert rebuild().fingerprint != first.fingerprint
    assert entries(pickle.loads(worker_copy)) == entries(first.train)  # the running job reads on
    assert len(list(work.glob("gen-*"))) == len(list((work / "packed").glob("*.bin"))) - 1 == 2  # + validation's
    rebuild()  # the first is neither published nor the one replaced, but younger than a day
    assert entries(pickle.loads(worker_copy)) == entries(first.train)
    assert len(list(work.glob("gen-*"))) == len(list((work / "packed").glob("*.bin"))) - 1 == 3
    day_old = time.time() - 86400 - 60
    os.utime(work / first.generation, (day_old, day_old))
    rebuild()
    with pytest.raises(DataError, match="unreadable or was replaced while in use"):
        pickle.loads(worker_copy)
    assert len(list(work.glob("gen-*"))) == len(list((work / "packed").glob("*.bin"))) - 1 == 3


def test_two_builds_at_once_leave_every_index_they_return_on_a_generation_that_exists(tmp_path, monkeypatch,
                                                                                      capsys):
    """An array of jobs on a new folder, or `alexdist index` beside a job that builds: build B runs while build A
    is between reading the published index and publishing its own. Unlocked, A's clean removed the generation B
    published and returned (its loader workers, which open a split again by path, then fail), or B's clean removed
    A's with index.json on it. One build at a time: B waits, then returns the index A built."""
    import threading

    from alexdist.data import index as index_module

    c, real, b = cfg(write_folder(tmp_path / "f"), tmp_path), index_module.mean_std, {}
    thread = threading.Thread(target=lambda: b.setdefault("index", build_index(c, progress=True)))

    def b_builds_meanwhile(read, n):
        if not thread.is_alive() and "index" not in b:  # A's build (B's own measures as it is)
            thread.start()
            said, deadline = "", time.time() + 60
            while thread.is_alive() and "waiting for another build" not in said and time.time() < deadline:
                time.sleep(0.05)
                said += capsys.readouterr().err
            b["said"] = said
        return real(read, n)

    monkeypatch.setattr(index_module, "mean_std", b_builds_meanwhile)
    a = build_index(c, progress=False)
    thread.join(60)
    import socket

    assert f"by {socket.gethostname()} pid {os.getpid()} since " in b["said"]  # who holds the lock: here, A
    published = json.loads(index_file(c).read_text())["generation"]
    assert (index_file(c).parent / published / "meta.json").is_file()
    for idx in (a, b["index"]):
        assert entries(pickle.loads(pickle.dumps(idx.train))) == entries(idx.train)  # as a loader worker reads
    assert a.generation == b["index"].generation == published


def test_a_parquet_file_gone_since_the_listing_is_named_in_one_line(tmp_path):
    from alexdist.data import index_parquet
    from alexdist.data.index_parts import Job

    job = Job("train", str(tmp_path), "data/train-00001-of-00002.parquet", None, ("image", "label"))
    with pytest.raises(DataError) as err:
        index_parquet.index_part(job, tmp_path)
    assert str(err.value).startswith(f"'{tmp_path}/data/train-00001-of-00002.parquet' could not be read (No such "
                                     f"file or directory); restore it") and "\n" not in str(err.value)


def test_a_class_folder_gone_since_the_plan_is_refused_not_listed_as_empty(tmp_path):
    with pytest.raises(DataError, match=r"the folder '.*/gone' could not be listed \(No such file or directory\)"):
        index_folder.list_images(tmp_path / "gone", (".jpeg",))


def test_a_class_subfolder_that_cannot_be_listed_is_refused_not_skipped(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list unless told otherwise: its images would be missing without a word.
    (The permission error is raised by a stand-in for os.scandir: as root, a chmod would not stop the listing.)"""
    root = write_folder(tmp_path / "folder")
    locked = root / "train" / "dog" / "more"
    locked.mkdir()
    real = os.scandir

    def scandir(path="."):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError) as err:
        build_index(cfg(root, tmp_path), progress=False)
    assert str(err.value) == (f"the folder '{locked}' could not be listed (Permission denied); make it readable (or "
                              f"remove it) and index again")
