"""What `export`, `evaluate` and `predict` accept as weights: a weights file, a checkpoint directory, or a run
directory (its final weights, else its newest complete checkpoint, said in one line)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from alexdist.checkpoint.consolidate import consolidate
from alexdist.checkpoint.state import STATE_FILE, complete_checkpoints
from alexdist.checkpoint.weights import load_weights
from alexdist.errors import DataError

FINAL_WEIGHTS = "model.safetensors"  # what a finished run writes into its output_dir


def resolve_source(path: str | Path) -> tuple[Path, str | None]:
    """The weights file or checkpoint `path` stands for, and the line that says which one a run directory gave
    (None when `path` is a weights file or a checkpoint itself)."""
    p = Path(path)
    if not p.is_dir() or (p / STATE_FILE).is_file():
        return p, None
    if (p / FINAL_WEIGHTS).is_file():
        return p / FINAL_WEIGHTS, f"alexdist: {p} is a run directory: using its final weights ({FINAL_WEIGHTS})"
    found = complete_checkpoints(p)
    if found:
        return found[-1], (f"alexdist: {p} is a run directory without final weights: using its newest complete "
                           f"checkpoint ({found[-1].name})")
    raise DataError(f"'{p}' is neither a checkpoint nor a run directory with final weights or a complete checkpoint; "
                    f"pass a weights file, a checkpoints/step-* directory or a run's output_dir")


def load_source(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """(weights, metadata, the file or checkpoint they came from) for any of the accepted paths; a run
    directory's choice is said on stderr (stdout stays the command's own output, e.g. --json)."""
    source, said = resolve_source(path)
    if said:
        print(said, file=sys.stderr)
    weights, meta = consolidate(source) if source.is_dir() else load_weights(source)
    return weights, meta, source
