"""A weights file as an ONNX model, checked with onnxruntime against PyTorch's logits.

The graph takes normalised images (float32 N x 3 x S x S, S the model's input size, CIFAR-10's mean and std
as in alexdist.data.batches) with any batch size, and returns logits (N x 10). The file is self-contained, so it
can be copied anywhere; only a model over torch's 1.5 GiB limit gets its weights in `FILE.data` beside it.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch

from alexdist.checkpoint.weights import model_for
from alexdist.errors import SetupError, require_extra
from alexdist.fileio import share


def require_onnx() -> None:
    """The packages of the `onnx` extra, or one line saying how to install them: torch's dynamo exporter writes
    through onnxscript (onnx's graph classes), onnxruntime checks the result."""
    require_extra("onnx", "alexdist export --onnx", "onnx", "onnxscript", "onnxruntime")


def export_onnx(weights: dict[str, torch.Tensor], meta: dict[str, str], out: str | Path) -> float:
    """Write the ONNX file (atomically; a failure leaves nothing behind); returns the largest |logit difference|
    between onnxruntime and PyTorch on a batch of 8 random inputs, after refusing a difference above 1e-4."""
    require_onnx()
    model = model_for(meta, weights)
    size = int(meta["input_size"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A hidden folder beside `out` (one filesystem: the moves below are renames) where the file already has its
    # final name: the exporter names an external data file after the file it writes and records that name in it.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        written = staging / out.name
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            # dynamic_shapes by position: a dict is keyed by forward's argument name, `input` in nn.Sequential
            torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(written), input_names=["images"],
                              output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                              dynamo=True, external_data=False, verbose=False)
        diff = _logit_difference(written, model, size)
        if not diff <= 1e-4:  # NaN too
            raise SetupError(f"the ONNX model's logits differ from PyTorch's by {diff:.2e} (> 1e-4); not writing {out}")
        for data in sorted(p for p in staging.iterdir() if p != written):  # the data file before the graph
            share(data)  # the umask's mode, whichever way the exporter creates its files
            os.replace(data, out.parent / data.name)
        share(written)
        os.replace(written, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return diff


def _logit_difference(path: Path, model: torch.nn.Module, size: int) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(check)
    got = torch.from_numpy(session.run(None, {"images": check.numpy()})[0])
    return (got - want).abs().max().item()
