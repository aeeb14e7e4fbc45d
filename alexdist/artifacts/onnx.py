"""A weights file as an ONNX model, checked with onnxruntime against PyTorch's logits.

The graph takes normalised images (float32 N x 3 x S x S, S the model's input size) with any batch size, and
returns logits (N x classes). The caller prepares them as the run's evaluation did, which the model's
metadata_props say (onnx.load(FILE).metadata_props; the weights' checkpoint.weights.Pipeline): decode to RGB;
resize the shorter side to `eval_resize` and keep the centre `image_size` square (eval_resize null: resize the
whole image to that square); pixels / 255, then (x - `mean`) / `std` per channel; resize (bilinear) to
`input_size` where that differs. `classes` names the logits.
The file is self-contained, so it can be copied anywhere; only a model over torch's 1.5 GiB limit gets its
weights in `FILE.data` beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from alexdist.checkpoint.weights import classes_of, model_for, pipeline_of
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
    pipeline = pipeline_of(meta)
    size = pipeline.input_size
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A hidden folder beside `out` (one filesystem: the moves below are renames) where the file already has its
    # final name: the exporter names an external data file after the file it writes and records that name in it.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        written = staging / out.name
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            # dynamic_shapes by position: a dict is keyed by forward's argument name, `input` in nn.Sequential
            program = torch.onnx.export(model, (torch.randn(2, 3, size, size),), input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        dynamo=True, verbose=False)
        program.model.metadata_props.update(onnx_metadata(meta))
        program.save(str(written), external_data=False)
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


def onnx_metadata(meta: dict[str, str]) -> dict[str, str]:
    """What a caller needs to feed the graph (the module's docstring says how), as ONNX metadata_props strings."""
    p = pipeline_of(meta)
    return {"image_size": str(p.image_size), "eval_resize": json.dumps(p.eval_resize),
            "input_size": str(p.input_size), "mean": json.dumps(list(p.mean)),
            "std": json.dumps(list(p.std)), "scale": "pixels / 255, then (x - mean) / std",
            "classes": json.dumps(classes_of(meta)), "model": meta["model"]}


def _logit_difference(path: Path, model: torch.nn.Module, size: int) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(check)
    got = torch.from_numpy(session.run(None, {"images": check.numpy()})[0])
    return (got - want).abs().max().item()
