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
    monkeypatch.setattr(run_data_streamed, "streamed_run_data", lambda recipe, acc: built)
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
