"""Consolidate a checkpoint into one safetensors state dict the model registry loads, without pickle.

    python -m alexdist.export runs/bn/checkpoints/step-0039000 bn.safetensors

DDP checkpoints hold (possibly sharded) safetensors weights; ZeRO-1/2/3 checkpoints hold DeepSpeed's
partitions, which DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` merges into fp32 weights.
The file's metadata names the model, its input size and width, so `alexdist.evaluate` and
`alexdist.models.build_model` can rebuild it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from alexdist.checkpoint import STATE_FILE, read_state
from alexdist.config import Recipe
from alexdist.errors import AlexdistError, DataError
from alexdist.models import resolve_input_size
from alexdist.safety import check_pickles

DS_TAG = "pytorch_model"  # the tag Accelerate's save_state gives DeepSpeed's checkpoint


def is_deepspeed_checkpoint(path: Path) -> bool:
    return (path / DS_TAG).is_dir()


def _ddp_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(path / f)))
    return out


def consolidate(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(fp32 state dict, metadata) from a checkpoint directory written by alexdist.train."""
    path = Path(checkpoint)
    if not (path / STATE_FILE).is_file():
        raise DataError(f"'{path}' is not an alexdist checkpoint (no {STATE_FILE}); pass a checkpoints/step-* directory")
    recipe = Recipe.model_validate(yaml.safe_load((path / "config.yaml").read_text()))
    state = read_state(path)
    if is_deepspeed_checkpoint(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_pickles(path / DS_TAG)  # DeepSpeed unpickles with weights_only=False

        weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
    else:
        weights = _ddp_weights(path)
    meta = {
        "model": recipe.model.name,
        "input_size": str(resolve_input_size(recipe.model.name, recipe.model.input_size)),
        "width_mult": str(recipe.model.width_mult),
        "dropout": str(recipe.model.dropout),
        "data_source": recipe.data.source,
        "data": json.dumps(recipe.data.model_dump(exclude={"cache_dir"})),
        "step": str(state.global_step),
        "test_acc": "" if state.test_acc is None else repr(state.test_acc),
    }
    return {k: v.detach().float().contiguous() for k, v in weights.items()}, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m alexdist.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoints/step-* directory")
    ap.add_argument("out", help="output .safetensors file")
    args = ap.parse_args(argv)
    try:
        from safetensors.torch import save_file

        weights, meta = consolidate(args.checkpoint)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        save_file(weights, str(tmp), metadata=meta)
        tmp.replace(out)
    except AlexdistError as exc:
        print(f"alexdist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    n = sum(v.numel() for v in weights.values())
    print(f"alexdist: exported {meta['model']} ({n:,} values, step {meta['step']}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
