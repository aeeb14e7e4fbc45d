"""`alexdist export`: consolidate a checkpoint into one weights file (safetensors, no pickle).

    alexdist export runs/bn/checkpoints/step-0039000 bn.safetensors
    alexdist export runs/bn/model.safetensors --onnx bn.onnx --hub-dir hub/bn

DDP checkpoints hold (possibly sharded) safetensors weights; ZeRO-1/2/3 checkpoints hold DeepSpeed's
partitions, which DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` merges into fp32 weights; FSDP
checkpoints hold DCP shards, which DCP reads into the whole model in one process.
The file is the format of `alexdist.weights`, the same as the final weights a run writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from alexdist import fsdp
from alexdist.checkpoint import STATE_FILE, read_state
from alexdist.config import Recipe
from alexdist.data import CIFAR10_CLASSES
from alexdist.errors import CheckpointError, DataError, run_command
from alexdist.fsdp import DCP_DIR
from alexdist.manifest import damage
from alexdist.models import build_model, resolve_input_size
from alexdist.safety import check_pickles
from alexdist.weights import load_weights, plain_weights, save_weights, weights_metadata

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
        raise DataError(
            f"'{path}' is not an alexdist checkpoint (no {STATE_FILE}); pass a checkpoints/step-* directory"
        )
    if problem := damage(path):
        raise CheckpointError(f"checkpoint {path} is damaged ({problem}); export another checkpoint")
    recipe = Recipe.model_validate(yaml.safe_load((path / "config.yaml").read_text()))
    state = read_state(path)
    classes = state.classes or list(CIFAR10_CLASSES)  # checkpoints from before class names were recorded
    if is_deepspeed_checkpoint(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_pickles(path / DS_TAG)  # DeepSpeed unpickles with weights_only=False

        weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
    elif (path / DCP_DIR).is_dir():
        m = recipe.model
        model = build_model(m.name, resolve_input_size(m.name, m.input_size), m.dropout, m.width_mult, len(classes))
        if recipe.precision == "fp64":
            model = model.double()
        weights = fsdp.consolidate(path / DCP_DIR, model)
    else:
        weights = _ddp_weights(path)
    if recipe.train.ema_eval and (path / EMA_FILE).is_file():
        weights = _with_ema(path, weights, recipe, len(classes))
    return plain_weights(weights), weights_metadata(recipe, state.global_step, state.test_acc, classes)


EMA_FILE = "custom_checkpoint_0.pkl"  # Accelerate's name for the first object registered for checkpointing


def _with_ema(path: Path, weights: dict[str, torch.Tensor], recipe: Recipe, num_classes: int
              ) -> dict[str, torch.Tensor]:
    """A train.ema_eval run's model is its EMA: the checkpoint's EMA parameters in place of the weights'."""
    check_pickles(path)
    ema = torch.load(path / EMA_FILE, map_location="cpu", weights_only=True)
    m = recipe.model
    names = [n for n, _ in build_model(m.name, resolve_input_size(m.name, m.input_size), m.dropout,
                                       m.width_mult, num_classes).named_parameters()]
    return {**weights, **dict(zip(names, ema["params"], strict=True))}


def main(argv: list[str] | None = None, prog: str = "python -m alexdist.export") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a checkpoints/step-* directory, or a weights file (e.g. a run's model.safetensors)")
    ap.add_argument("out", nargs="?", help="output .safetensors file")
    ap.add_argument("--onnx", metavar="FILE", help="also write an ONNX model (checked with onnxruntime)")
    ap.add_argument("--hub-dir", metavar="DIR", help="also write a Hub model folder (weights, config.json, model card)")
    args = ap.parse_args(argv)
    if not (args.out or args.onnx or args.hub_dir):
        ap.error("give OUT.safetensors, --onnx FILE or --hub-dir DIR")

    def body() -> int:
        source = Path(args.source)
        weights, meta = consolidate(source) if source.is_dir() else load_weights(source)
        n = sum(v.numel() for v in weights.values())
        if args.out:
            out = save_weights(args.out, weights, meta)
            print(f"alexdist: exported {meta['model']} ({n:,} values, step {meta['step']}) to {out}")
        if args.onnx:
            from alexdist.onnx_export import export_onnx

            diff = export_onnx(weights, meta, args.onnx)
            print(f"alexdist: wrote {args.onnx} (onnxruntime vs PyTorch logits: max difference {diff:.1e})")
        if args.hub_dir:
            from alexdist.evaluate import evaluate_weights
            from alexdist.hub import write_hub_dir

            out = write_hub_dir(source, weights, meta, evaluate_weights(source), args.hub_dir)
            print(f"alexdist: wrote the Hub folder {out} (publish it with: hf upload USER/REPO {out} .)")
        return 0

    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
