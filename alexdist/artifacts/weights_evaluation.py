"""Evaluating weights on one process (`alexdist evaluate`): test loss, accuracy, per-class accuracy and the
confusion matrix of a weights file, checkpoint or run directory, a report a user reads, and a W&B eval run.

The model comes from the weights' own metadata (or the checkpoint's config.yaml); the data from the same
place unless a recipe or `data.source=...` says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alexdist.artifacts.export import load_source
from alexdist.checkpoint.weights import classes_of
from alexdist.config import load_recipe
from alexdist.data.batches import CIFAR_MEAN, CIFAR_STD, MemoryEvalSet
from alexdist.data.cache import load_dataset
from alexdist.errors import DataError
from alexdist.models import build_model
from alexdist.training.evaluation import evaluate_ranks


@torch.no_grad()
def evaluate_weights(path: str | Path, recipe_path: str | None = None, overrides: list[str] = (),
                     tta: str = "none") -> dict:
    weights, meta, _ = load_source(path)
    base = [f"model.name={meta['model']}", f"model.input_size={meta['input_size']}",
            f"model.width_mult={meta.get('width_mult', '1.0')}"]
    if recipe_path is None:  # the data the weights were trained and evaluated on, unless told otherwise
        if meta.get("data"):
            base += [f"data.{k}={json.dumps(v)}" for k, v in json.loads(meta["data"]).items()]
        elif meta.get("data_source"):
            base.append(f"data.source={json.dumps(meta['data_source'])}")
    recipe = load_recipe(recipe_path, base + list(overrides))
    size = int(meta["input_size"])
    classes = classes_of(meta)
    model = build_model(recipe.model.name, size, 0.0, recipe.model.width_mult, num_classes=len(classes))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise DataError(
            f"'{path}' does not fit model {recipe.model.name} (missing {len(missing)}, unexpected {len(unexpected)} "
            f"tensors, e.g. {(missing or unexpected)[0]}); evaluate it with the model it was trained as"
        )
    ds = load_dataset(recipe.data)
    if len(ds.classes) != len(classes):
        raise DataError(f"'{path}' was trained on {len(classes)} classes, data.source={recipe.data.source} has "
                        f"{len(ds.classes)}; evaluate it on the data it was trained for")
    test = MemoryEvalSet(ds.test_x, ds.test_y, size, recipe.data.mean or CIFAR_MEAN, recipe.data.std or CIFAR_STD)
    ev = evaluate_ranks(None, model, test, recipe.train.eval_batch_size, torch.float32,
                        tta=tta, num_classes=len(classes))
    out = {"test_loss": ev.loss, "test_acc": ev.acc, "images": len(ds.test_y), "model": recipe.model.name,
           "step": meta.get("step"), "classes": classes, "per_class_acc": ev.per_class_acc(),
           "confusion": ev.confusion}
    if tta != "none":
        out.update(tta=tta, tta_loss=ev.tta_loss, tta_acc=ev.tta_acc)
    return out


def report(r: dict) -> str:
    """The result as a user reads it: the totals, then accuracy and the commonest confusion per class."""
    lines = [f"{r['model']} step {r['step']}: test loss {r['test_loss']:.4f} acc {r['test_acc']:.4f} "
             f"({r['images']} images)"
             + (f" | TTA {r['tta']}: loss {r['tta_loss']:.4f} acc {r['tta_acc']:.4f}" if r.get("tta") else "")]
    width = max(len(c) for c in r["classes"])
    for i, (name, acc) in enumerate(zip(r["classes"], r["per_class_acc"], strict=True)):
        row = r["confusion"][i]
        wrong = max((n, j) for j, n in enumerate(row) if j != i)
        most = f"  most often taken for {r['classes'][wrong[1]]} ({wrong[0]})" if wrong[0] else ""
        lines.append(f"  {name:<{width}}  {acc:.4f}  of {sum(row):>5}{most}")
    return "\n".join(lines)


def log_eval_run(result: dict, weights: str, project: str, group: str | None) -> None:
    """One W&B run with job_type=eval, so evaluations sit beside the training runs they measure."""
    import wandb

    from alexdist.tracking.trackers import resolve_wandb_mode

    run = wandb.init(project=project, group=group, job_type="eval", mode=resolve_wandb_mode() or "disabled",
                     config={"weights": str(weights), "model.name": result["model"], "step": result["step"]},
                     tags=[result["model"], "eval"])
    run.summary.update({"test/acc": result["test_acc"], "test/loss": result["test_loss"], "images": result["images"]})
    run.finish()
