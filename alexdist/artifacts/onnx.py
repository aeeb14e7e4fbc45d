"""A weights file as an ONNX model, checked with onnxruntime against PyTorch's logits.

The graph takes normalised images (float32 N x 3 x S x S, S the model's input size, CIFAR-10's mean and std
as in alexdist.data.batches) with any batch size, and returns logits (N x 10).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from alexdist.checkpoint.weights import model_for
from alexdist.errors import SetupError
from alexdist.fileio import atomic_path


def export_onnx(weights: dict[str, torch.Tensor], meta: dict[str, str], out: str | Path) -> float:
    """Write the ONNX file (atomically); returns the largest |logit difference| between onnxruntime and PyTorch
    on a batch of 8 random inputs, after refusing a difference above 1e-4."""
    import importlib.util

    if importlib.util.find_spec("onnxscript") is None or importlib.util.find_spec("onnxruntime") is None:
        raise SetupError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'alexdist[onnx]'")
    import onnxruntime

    model = model_for(meta, weights)
    size = int(meta["input_size"])
    example = torch.randn(2, 3, size, size)
    out = Path(out)
    with atomic_path(out) as tmp, contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        check = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = model(check)
        got = torch.from_numpy(session.run(None, {"images": check.numpy()})[0])
        diff = (got - want).abs().max().item()
        if diff > 1e-4:
            raise SetupError(f"the ONNX model's logits differ from PyTorch's by {diff:.2e} (> 1e-4); not writing {out}")
    return diff
