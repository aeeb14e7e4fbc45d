"""Test loss and accuracy of a checkpoint or an exported safetensors file, on one process.

    python -m alexdist.evaluate runs/bn/checkpoints/step-0039000
    python -m alexdist.evaluate bn.safetensors [recipe.yaml] [key=value ...]

The model comes from the weights' own metadata (or the checkpoint's config.yaml); the data from the same
place unless a recipe or `data.source=...` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from alexdist.batches import eval_batches, eval_shard
from alexdist.config import load_recipe
from alexdist.data import load_dataset
from alexdist.distributed import plain_module
from alexdist.errors import AlexdistError, DataError
from alexdist.export import consolidate
from alexdist.models import build_model


def batch_stats(loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed loss, correct, count] as float64 on the device (no host sync)."""
    correct = (logits.argmax(1) == labels).sum()
    n = torch.tensor(len(labels), dtype=torch.float64, device=labels.device)
    return torch.stack([loss_sum.double(), correct.double(), n])


@torch.no_grad()
def evaluate_ranks(accelerator, model, x, y, batch_size: int, input_size: int, in_dtype, zero3: bool) -> tuple[float, float]:
    """Test loss and accuracy over every test image exactly once, summed across ranks."""
    rank, world = accelerator.process_index, accelerator.num_processes
    # DDP's forward would broadcast buffers (a collective) while ranks may hold different numbers of test
    # batches, so the unwrapped module runs (Accelerate's autocast wrapper is kept). ZeRO-3 gathers
    # parameters in every forward, a collective too: there every rank runs the same number of forwards.
    net = model if zero3 else plain_module(accelerator, model)
    was_training = net.training
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    batches = list(eval_batches(x, y, rank, world, batch_size, input_size))
    n_forward = math.ceil(len(eval_shard(len(y), 0, world)) / batch_size) if zero3 else len(batches)
    for i in range(n_forward):
        xb, yb = batches[min(i, len(batches) - 1)]
        out = net(xb.to(in_dtype)).float()
        if i < len(batches):  # extra forwards only keep ZeRO-3's collectives in step
            sums += batch_stats(F.cross_entropy(out, yb, reduction="sum"), out, yb)
    net.train(was_training)
    loss, correct, count = accelerator.reduce(sums, reduction="sum").tolist()
    return loss / count, correct / count


def average_buffers(accelerator, model) -> None:
    """DeepSpeed does not broadcast buffers as DDP does: average BatchNorm statistics before evaluating/saving."""
    if accelerator.num_processes == 1:
        return
    for buf in plain_module(accelerator, model).buffers():
        if buf.is_floating_point():
            buf.copy_(accelerator.reduce(buf.detach().clone(), reduction="mean"))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if path.is_dir():
        return consolidate(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise DataError(f"'{path}' does not exist") from None
    except Exception as exc:
        raise DataError(f"'{path}' is not a readable safetensors file ({exc}); export it again") from None
    if "model" not in meta:
        raise DataError(f"'{path}' has no 'model' metadata; export it with python -m alexdist.export")
    return weights, meta


@torch.no_grad()
def evaluate_weights(path: str | Path, recipe_path: str | None = None, overrides: list[str] = ()) -> dict:
    weights, meta = load_weights(path)
    base = [f"model.name={meta['model']}", f"model.input_size={meta['input_size']}",
            f"model.width_mult={meta.get('width_mult', '1.0')}"]
    if recipe_path is None:  # the data the weights were trained and evaluated on, unless told otherwise
        if meta.get("data"):
            base += [f"data.{k}={json.dumps(v)}" for k, v in json.loads(meta["data"]).items()]
        elif meta.get("data_source"):
            base.append(f"data.source={json.dumps(meta['data_source'])}")
    recipe = load_recipe(recipe_path, base + list(overrides))
    size = int(meta["input_size"])
    model = build_model(recipe.model.name, size, 0.0, recipe.model.width_mult)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise DataError(
            f"'{path}' does not fit model {recipe.model.name} (missing {len(missing)}, unexpected {len(unexpected)} "
            f"tensors, e.g. {(missing or unexpected)[0]}); evaluate it with the model it was trained as"
        )
    model.eval()
    ds = load_dataset(recipe.data)
    loss = correct = 0.0
    for xb, yb in eval_batches(ds.test_x, ds.test_y, 0, 1, recipe.train.eval_batch_size, size):
        out = model(xb).float()
        loss += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    n = len(ds.test_y)
    return {"test_loss": loss / n, "test_acc": correct / n, "images": n, "model": recipe.model.name,
            "step": meta.get("step")}


def log_eval_run(result: dict, weights: str, project: str, group: str | None) -> None:
    """One W&B run with job_type=eval, so evaluations sit beside the training runs they measure."""
    import os

    import wandb

    from alexdist.tracking import _has_wandb_key

    mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")
    run = wandb.init(project=project, group=group, job_type="eval", mode=mode,
                     config={"weights": str(weights), "model.name": result["model"], "step": result["step"]},
                     tags=[result["model"], "eval"])
    run.summary.update({"test/acc": result["test_acc"], "test/loss": result["test_loss"], "images": result["images"]})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m alexdist.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", help="a checkpoints/step-* directory or an exported .safetensors file")
    ap.add_argument("rest", nargs="*", help="[recipe.yaml] [key=value ...]")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--wandb-project", metavar="PROJECT",
                    help="also record the result as a W&B run (job_type=eval; WANDB_MODE applies, offline without a key)")
    ap.add_argument("--wandb-group", metavar="GROUP", help="W&B group, e.g. the training run's")
    args = ap.parse_args(argv)
    recipe = args.rest[0] if args.rest and "=" not in args.rest[0] else None
    overrides = args.rest[1:] if recipe else args.rest
    try:
        r = evaluate_weights(args.weights, recipe, overrides)
    except AlexdistError as exc:
        print(f"alexdist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.wandb_project:
        log_eval_run(r, args.weights, args.wandb_project, args.wandb_group)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} step {r['step']}: test loss {r['test_loss']:.4f} acc {r['test_acc']:.4f} ({r['images']} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
