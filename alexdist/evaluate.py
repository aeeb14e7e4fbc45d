"""`alexdist evaluate`: test loss and accuracy of a checkpoint or an exported weights file, on one process.

    alexdist evaluate runs/bn/checkpoints/step-0039000
    alexdist evaluate bn.safetensors [RECIPE] [key=value ...]

The model comes from the weights' own metadata (or the checkpoint's config.yaml); the data from the same
place unless a recipe or `data.source=...` says otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from alexdist.batches import eval_batches
from alexdist.config import load_recipe
from alexdist.data import load_dataset
from alexdist.errors import DataError, run_command
from alexdist.export import consolidate
from alexdist.models import build_model
from alexdist.weights import load_weights


@torch.no_grad()
def evaluate_weights(path: str | Path, recipe_path: str | None = None, overrides: list[str] = ()) -> dict:
    weights, meta = consolidate(path) if Path(path).is_dir() else load_weights(path)
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
    import wandb

    from alexdist.tracking import resolve_wandb_mode

    run = wandb.init(project=project, group=group, job_type="eval", mode=resolve_wandb_mode() or "disabled",
                     config={"weights": str(weights), "model.name": result["model"], "step": result["step"]},
                     tags=[result["model"], "eval"])
    run.summary.update({"test/acc": result["test_acc"], "test/loss": result["test_loss"], "images": result["images"]})
    run.finish()


def main(argv: list[str] | None = None, prog: str = "python -m alexdist.evaluate") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", help="a checkpoints/step-* directory or an exported .safetensors file")
    ap.add_argument("rest", nargs="*", help="[RECIPE] [key=value ...]")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--wandb-project", metavar="PROJECT",
                    help="also record the result as a W&B run (job_type=eval; WANDB_MODE applies, offline "
                         "without a key)")
    ap.add_argument("--wandb-group", metavar="GROUP", help="W&B group, e.g. the training run's")
    args = ap.parse_args(argv)
    recipe = args.rest[0] if args.rest and "=" not in args.rest[0] else None
    overrides = args.rest[1:] if recipe else args.rest

    def body() -> int:
        r = evaluate_weights(args.weights, recipe, overrides)
        if args.wandb_project:
            log_eval_run(r, args.weights, args.wandb_project, args.wandb_group)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['model']} step {r['step']}: test loss {r['test_loss']:.4f} acc {r['test_acc']:.4f} "
                  f"({r['images']} images)")
        return 0

    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
