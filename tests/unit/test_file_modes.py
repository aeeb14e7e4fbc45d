"""Files alexdist writes get the mode the umask asks for (0666 less the umask), as open() gives a new file: on a
shared disk the team reads the weights under umask 022 or 002, and nobody else does under 077."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import torch
from helpers import build_run

from alexdist.checkpoint.weights import save_weights
from alexdist.fileio import atomic_path, atomic_write_text

MODES = {0o022: 0o644, 0o002: 0o664, 0o077: 0o600}


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_the_weights_file_get_the_mode_of_the_umask(tmp_path):
    from safetensors.torch import save_file

    for mask, want in MODES.items():
        d = tmp_path / f"{mask:03o}"
        d.mkdir()
        with umask(mask):
            atomic_write_text(d / "summary.json", "{}\n")
            with atomic_path(d / "raw.safetensors") as tmp:
                save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors itself creates 0600
            save_weights(d / "model.safetensors", {"w": torch.ones(2)}, {"model": "alexnet"})
        got = {p.name: oct(mode(p)) for p in sorted(d.iterdir())}
        names = ["model.safetensors", "raw.safetensors", "summary.json"]
        assert got == dict.fromkeys(names, oct(want)), f"umask {mask:03o}"


def test_every_file_of_a_checkpoint_gets_the_mode_of_the_umask(tmp_path, monkeypatch, fresh_accelerate_state):
    run = build_run(tmp_path, monkeypatch, ["data.source=synthetic", "data.synthetic_train=64",
                                            "data.synthetic_test=16", "train.batch_size=16"])
    for step, (mask, want) in enumerate(MODES.items(), 1):
        run.state.global_step = step
        with umask(mask):
            ckpt = run.checkpointer.save(run.state)
        got = {str(p.relative_to(ckpt)): oct(mode(p)) for p in ckpt.rglob("*") if p.is_file()}
        assert "model.safetensors" in got and "optimizer.bin" in got
        assert got == dict.fromkeys(got, oct(want)), f"umask {mask:03o}"


def test_the_export_commands_files_get_the_mode_of_the_umask(tmp_path, monkeypatch):
    from alexdist.checkpoint.weights import weights_metadata
    from alexdist.commands.export import main
    from alexdist.config import load_recipe
    from alexdist.data.cache import load_dataset
    from alexdist.models import build_model

    monkeypatch.setenv("ALEXDIST_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe("quickstart", ["data.source=synthetic", "data.synthetic_train=16", "data.synthetic_test=16",
                                        "model.width_mult=0.25"])
    classes = load_dataset(recipe.data).classes
    source = save_weights(tmp_path / "run" / "model.safetensors",
                          build_model(recipe.model.name, 32, 0.0, 0.25, num_classes=len(classes)).state_dict(),
                          weights_metadata(recipe, 4, None, classes))
    out = tmp_path / "out"
    with umask(0o002):
        assert main([str(source), str(out / "m.safetensors"), "--onnx", str(out / "m.onnx"),
                     "--hub-dir", str(out / "hub")]) == 0
    got = {str(p.relative_to(out)): oct(mode(p)) for p in out.rglob("*") if p.is_file()}
    assert got == dict.fromkeys(["hub/README.md", "hub/config.json", "hub/model.safetensors", "m.onnx",
                                 "m.safetensors"], oct(0o664))
