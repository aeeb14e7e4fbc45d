"""`alexdist export --onnx`: one self-contained file that runs wherever it is moved, for any forward's argument
name (nn.Sequential's is `input`) and for torchvision's and timm's models; a failed export leaves nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from alexdist.artifacts.onnx import export_onnx
from alexdist.checkpoint.weights import model_for
from alexdist.models import build_model


def _weights(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    torch.manual_seed(0)
    meta = {"model": name, "input_size": "32", "width_mult": "1.0", "classes": json.dumps([str(i) for i in range(10)])}
    return build_model(name, 32, 0.0, 1.0, num_classes=10).state_dict(), meta


def _run_moved(files: list[Path], weights: dict[str, torch.Tensor], meta: dict[str, str], elsewhere: Path) -> float:
    """Move `files` to another folder, run the .onnx one there with onnxruntime; the largest difference from
    PyTorch's logits."""
    import onnxruntime

    elsewhere.mkdir()
    for f in files:
        shutil.move(f, elsewhere / f.name)
    session = onnxruntime.InferenceSession(str(elsewhere / files[0].name), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # a batch size it was not traced at
    with torch.no_grad():
        want = model_for(meta, weights)(x)
    return (torch.from_numpy(session.run(None, {"images": x.numpy()})[0]) - want).abs().max().item()


@pytest.mark.parametrize("name", ["mymodels:stack", "torchvision.models:resnet18", "timm.models:resnet18"])
def test_the_onnx_file_is_self_contained_and_runs_after_a_move(name, own_model_dir, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(own_model_dir))
    weights, meta = _weights(name)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    export_onnx(weights, meta, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx"]
    assert _run_moved([out], weights, meta, tmp_path / "elsewhere") < 1e-4


def _force_external_data(monkeypatch):
    """torch writes the weights beside the graph above 1.5 GiB: a threshold of 0 does it for a small model."""
    from torch.onnx._internal.exporter import _onnx_program

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)


def test_a_model_too_large_for_one_file_gets_its_data_file_under_the_final_name(own_model_dir, monkeypatch,
                                                                               tmp_path):
    monkeypatch.syspath_prepend(str(own_model_dir))
    _force_external_data(monkeypatch)
    weights, meta = _weights("mymodels:Tiny")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    export_onnx(weights, meta, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert _run_moved([out, out.with_name("m.onnx.data")], weights, meta, tmp_path / "elsewhere") < 1e-4


def test_a_failed_onnx_export_leaves_the_folder_as_it_was(own_model_dir, monkeypatch, tmp_path):
    import onnxruntime

    monkeypatch.syspath_prepend(str(own_model_dir))
    _force_external_data(monkeypatch)  # so that a data file exists when the check fails

    def fail(*args, **kwargs):
        raise RuntimeError("injected: onnxruntime cannot load the file")

    monkeypatch.setattr(onnxruntime, "InferenceSession", fail)
    (tmp_path / "m.onnx").write_text("the previous export")
    with pytest.raises(RuntimeError, match="injected"):
        export_onnx(*_weights("mymodels:Tiny"), tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_text() == "the previous export"
