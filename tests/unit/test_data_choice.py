"""Which path a run's data takes (alexdist/data/choice.py, training/run_data.py): data.loader=auto on a resume
follows the path the checkpoint recorded, a refusal reaches every rank, and the loader workers per process follow
the cores this process may run on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from alexdist.config import load_recipe
from alexdist.errors import ConfigError


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (40, 80, 120)).save(root / split / c / "0.png")
    return root


def _checkpoint(out: Path, loader: str) -> None:
    step = out / "checkpoints" / "step-0000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"global_step": 2, "data_loader": loader}))


ALONE = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)


def _path_taken(recipe, monkeypatch, accelerator=ALONE) -> str:
    """The path run_data takes (both paths' builders replaced: only the choice is under test)."""
    from alexdist.training import run_data, run_data_streamed

    built = SimpleNamespace(batches=SimpleNamespace(steps_per_epoch=1), train_images=1)
    monkeypatch.setattr(run_data_streamed, "streamed_run_data", lambda recipe, acc, *resumed: built)
    monkeypatch.setattr(run_data, "_memory_run_data", lambda recipe, acc: built)
    return run_data.run_data(recipe, accelerator).loader


def test_auto_on_a_resume_takes_the_checkpoints_path_even_when_the_estimate_has_moved(tmp_path, monkeypatch):
    """A resumed auto run whose estimate flips (other workers, other free memory) would be refused by the
    checkpoint's data check: it follows the path the checkpoint recorded instead."""
    from alexdist.data import choice

    folder, out = _image_folder(tmp_path / "imgs"), tmp_path / "run"
    recipe = load_recipe("quickstart", [f"data.source={folder}", f"output_dir={out}",
                                        f"data.cache_dir={tmp_path / 'cache'}"])
    assert _path_taken(recipe, monkeypatch) == "memory"  # a fresh start: 8 small images fit
    _checkpoint(out, "stream")
    assert _path_taken(recipe, monkeypatch) == "stream"
    recipe.checkpoint.resume = "never"  # a fresh start is decided afresh
    assert _path_taken(recipe, monkeypatch) == "memory"

    (out / "checkpoints" / "step-0000002").rename(out / "checkpoints" / "step-0000001")
    _checkpoint(out, "memory")
    monkeypatch.setattr(choice, "available_memory", lambda: 1)  # now the estimate says stream
    recipe.checkpoint.resume = "auto"
    assert _path_taken(recipe, monkeypatch) == "memory"
    recipe.checkpoint.resume = str(out / "checkpoints" / "step-0000001")  # a resume by path: that one's path
    assert _path_taken(recipe, monkeypatch) == "stream"
    recipe.checkpoint.resume = "auto"
    recipe.data.loader = "stream"  # set explicitly: as set (the checkpoint's check then refuses a switch)
    assert _path_taken(recipe, monkeypatch) == "stream"


def test_a_refused_data_path_is_raised_on_every_rank_with_the_same_line(tmp_path, monkeypatch):
    """The choice is made on rank 0 and broadcast: a refusal raised there alone would leave the other ranks in the
    broadcast until a timeout. Each rank raises rank 0's one line instead."""
    from alexdist.training import run_data

    broadcast = []

    def from_main(accelerator, value):  # rank 0 runs first and sends; rank 1 receives what it sent
        if accelerator.is_main_process:
            broadcast.append(value)
            return value
        assert broadcast, "rank 0 never broadcast: rank 1 would wait in from_main until the timeout"
        return broadcast[0]

    monkeypatch.setattr(run_data, "from_main", from_main)
    recipe = load_recipe("quickstart", ["data.source=synthetic", "data.loader=memory",
                                        "augment.random_resized_crop=true", f"output_dir={tmp_path / 'run'}"])
    messages = []
    for rank in (0, 1):
        acc = SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0)
        with pytest.raises(ConfigError) as err:
            _path_taken(recipe, monkeypatch, acc)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "\n" not in messages[0]
    assert "augment.random_resized_crop applies to streamed data only; set data.loader=stream" in messages[0]


def test_loader_workers_follow_the_cores_this_process_may_run_on_shared_by_the_local_processes(monkeypatch):
    """A Slurm job (cgroup) or taskset grants fewer cores than the node has: os.cpu_count() would count them all."""
    from alexdist.data.choice import default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert [default_workers(n) for n in (1, 2, 4, 8)] == [6, 3, 1, 1]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(40)), raising=False)
    assert default_workers(2) == 8  # at most 8
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS has no affinity: the count
    assert default_workers(16) == 4


def test_the_auto_estimate_counts_the_images_the_index_takes(tmp_path, monkeypatch):
    """data.loader=auto sizes a folder by the files the index would take: val/ as the test split (not test/ too),
    images in a class folder's subfolders, no other files."""
    from PIL import Image

    from alexdist.config import AugmentConfig, DataConfig
    from alexdist.data import choice
    from alexdist.data.index import build_index

    root = _image_folder(tmp_path / "imgs")  # train/{cat,dog}/0.png, val/{cat,dog}/0.png
    (root / "train" / "cat" / "deep").mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "train" / "cat" / "deep" / "1.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    for c in ("cat", "dog"):  # a second test folder: the index takes val/ only
        (root / "test" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "test" / c / "0.png")
    monkeypatch.setattr(choice, "available_memory", lambda: 1)  # the estimate's figure goes into the reason
    cfg = DataConfig(source=str(root), cache_dir=str(tmp_path / "cache"), workers=0)
    loader, why = choice.choose_loader(cfg, AugmentConfig(), 1)
    index = build_index(cfg, progress=False)
    assert loader == "stream" and len(index.train) + len(index.test) == 5
    assert why.startswith("5 images at data.image_size=")


class _Ranks:
    """Two ranks run as threads, with the collectives from_main and first_failure between them: values sent as
    pickles (as a broadcast does); a rank left waiting for a peer that raised fails its wait (BrokenBarrierError)."""

    def __init__(self, monkeypatch, n=2):
        import pickle
        import threading

        from alexdist.training import run_data_streamed

        self.barrier, self.slots, self.pickle = threading.Barrier(n, timeout=20), [None] * n, pickle
        monkeypatch.setattr(run_data_streamed, "from_main", self.from_main, raising=False)
        monkeypatch.setattr(run_data_streamed, "first_failure", self.first_failure, raising=False)

    def accelerator(self, rank):
        return SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0,
                               wait_for_everyone=self.barrier.wait)

    def exchange(self, rank, value):
        self.barrier.wait()
        self.slots[rank] = self.pickle.dumps(value)
        self.barrier.wait()
        got = [self.pickle.loads(s) for s in self.slots]
        self.barrier.wait()
        return got

    def from_main(self, accelerator, value):
        return self.exchange(accelerator.process_index, value)[0]

    def first_failure(self, accelerator, error):
        return next(((r, e) for r, e in enumerate(self.exchange(accelerator.process_index, error)) if e), None)

    def run(self, work) -> list:
        """work(rank) on each rank at once: its result or the exception it raised, per rank."""
        import threading

        out = [None, None]

        def one(rank):
            try:
                out[rank] = work(rank)
            except Exception as exc:
                out[rank] = exc

        threads = [threading.Thread(target=one, args=(r,), name=f"rank{r}") for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        self.barrier.abort()  # a rank still waiting for a peer that raised: as a dead peer, its collective fails
        for t in threads:
            t.join(20)
        return out


def _stream_recipe(folder, tmp_path, cache="cache"):
    return load_recipe("quickstart", [f"data.source={folder}", "data.loader=stream", "data.workers=0",
                                      f"data.cache_dir={tmp_path / cache}", f"output_dir={tmp_path / 'run'}"])


def test_an_index_refused_on_rank_0_is_raised_on_every_rank_with_the_same_line(tmp_path, monkeypatch):
    """Rank 0 builds the index; its refusal (here an empty train class folder) raised there alone would leave the
    other ranks waiting for it until a timeout."""
    from alexdist.errors import DataError
    from alexdist.training.run_data_streamed import _index_once

    folder = _image_folder(tmp_path / "imgs")
    (folder / "train" / "eel").mkdir()
    ranks = _Ranks(monkeypatch)
    recipe = _stream_recipe(folder, tmp_path)
    got = ranks.run(lambda rank: _index_once(recipe, ranks.accelerator(rank)))
    assert all(isinstance(e, DataError) for e in got), got
    assert str(got[0]) == str(got[1]) and "'eel'" not in str(got[0]) and "holds no images" in str(got[0])


def test_every_rank_reads_the_generation_rank_0_loaded_though_a_rebuild_published_another(tmp_path, monkeypatch):
    """`alexdist index` may publish a new generation between rank 0's load and another rank's: each rank reading
    index.json for itself would train on other data than rank 0."""
    import threading

    from alexdist.data import index as index_module
    from alexdist.training import run_data_streamed

    folder = _image_folder(tmp_path / "imgs")
    recipe = _stream_recipe(folder, tmp_path)
    first = index_module.build_index(recipe.data, progress=False)
    pointer = index_module.index_file(recipe.data)
    before = pointer.read_text()
    os.utime(folder / "train" / "cat" / "0.png", (1, 1))  # the files changed: a new generation
    after = index_module.build_index(recipe.data, progress=False)
    assert after.fingerprint != first.fingerprint
    rebuilt = pointer.read_text()
    pointer.write_text(before)  # the job starts on the first
    real, published = index_module.load_index, threading.Event()

    def load_index(cfg, *generation):
        if threading.current_thread().name == "rank1":
            assert published.wait(20)
        index = real(cfg, *generation)
        if threading.current_thread().name == "rank0":
            pointer.write_text(rebuilt)  # the rebuild publishes meanwhile
            published.set()
        return index

    monkeypatch.setattr(index_module, "load_index", load_index)
    monkeypatch.setattr(run_data_streamed, "load_index", load_index, raising=False)
    ranks = _Ranks(monkeypatch)
    got = ranks.run(lambda rank: run_data_streamed._index_once(recipe, ranks.accelerator(rank)))
    assert [i.fingerprint for i in got] == [first.fingerprint] * 2, got


def test_an_index_another_node_cannot_read_is_said_on_every_rank_naming_the_host_and_the_cache(tmp_path,
                                                                                            monkeypatch):
    """data.cache_dir on a node-local disk: rank 0 built the index on its node, another node finds none there.
    That rank alone raising 'no index yet' would point the wrong way (and leave rank 0 waiting)."""
    import socket

    from alexdist.errors import DataError
    from alexdist.training.run_data_streamed import _index_once

    folder = _image_folder(tmp_path / "imgs")
    recipes = [_stream_recipe(folder, tmp_path), _stream_recipe(folder, tmp_path, "other-node-cache")]
    ranks = _Ranks(monkeypatch)
    got = ranks.run(lambda rank: _index_once(recipes[rank], ranks.accelerator(rank)))
    assert all(isinstance(e, DataError) for e in got), got
    assert str(got[0]) == str(got[1]) and "\n" not in str(got[0])
    assert f"rank 1 on {socket.gethostname()} cannot read the index rank 0 loaded" in str(got[0])
    assert "must be on a file system every node mounts" in str(got[0])


def test_a_streamed_resume_normalizes_with_the_checkpoints_figures_not_a_rebuilt_indexs(tmp_path, monkeypatch):
    """The index measures mean and std on a sample of train images; rebuilt (a wiped cache, another Pillow) it may
    measure others. A resume with data.mean/std unset continues with the figures the checkpoint trained with."""
    import torch

    from alexdist.training import run_data

    folder, out = _image_folder(tmp_path / "imgs"), tmp_path / "run"
    recipe = load_recipe("quickstart", [f"data.source={folder}", "data.loader=stream", "data.workers=0",
                                        "train.batch_size=2", f"data.cache_dir={tmp_path / 'cache'}",
                                        f"output_dir={out}"])
    acc = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True, device=torch.device("cpu"),
                          wait_for_everyone=lambda: None)
    fresh = run_data.run_data(recipe, acc)
    measured = (tuple(fresh.mean), tuple(fresh.std))
    _checkpoint(out, "stream")
    state = out / "checkpoints" / "step-0000002" / "trainer_state.json"
    trained = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    state.write_text(json.dumps({**json.loads(state.read_text()), "normalization": trained}))
    resumed = run_data.run_data(recipe, acc)
    assert measured != ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert (list(resumed.mean), list(resumed.std)) == (trained["mean"], trained["std"])
    recipe.data.mean = [0.5, 0.5, 0.5]  # set: the recipe's (config_changes refuses a change on resume)
    assert list(run_data.run_data(recipe, acc).mean) == [0.5, 0.5, 0.5]
