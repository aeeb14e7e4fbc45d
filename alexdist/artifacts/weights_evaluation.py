"""Evaluating weights on one process (`alexdist evaluate`): test loss, accuracy, per-class accuracy and the
confusion matrix of a weights file, checkpoint or run directory, a report a user reads, and a W&B eval run.

The model and its input pipeline (image size, resize and centre crop, normalization) come from the weights' own
metadata (checkpoint.weights.pipeline_of); the data from the same place unless a recipe or `data.source=...`
says otherwise. The test split is read as a run reads it: decoded into memory, or streamed from its index when
data.loader (or the stored data.eval_resize) says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from alexdist.artifacts.export import load_source
from alexdist.checkpoint.weights import Pipeline, classes_of, pipeline_of
from alexdist.config import Recipe, load_recipe
from alexdist.data.interface import EvalSet
from alexdist.errors import DataError
from alexdist.models import build_model
from alexdist.training.evaluation import evaluate_ranks


def _recipe(meta: dict[str, str], pipeline: Pipeline, recipe_path: str | None, overrides: list[str]) -> Recipe:
    """The recipe to evaluate with: the weights' model, data (without a recipe) and pipeline, then the user's."""
    base = [f"model.name={meta['model']}", f"model.input_size={meta['input_size']}",
            f"model.width_mult={meta.get('width_mult', '1.0')}"]
    if recipe_path is None:  # the data the weights were trained and evaluated on, unless told otherwise
        if meta.get("data"):
            base += [f"data.{k}={json.dumps(v)}" for k, v in json.loads(meta["data"]).items()]
        elif meta.get("data_source"):
            base.append(f"data.source={json.dumps(meta['data_source'])}")
    p = pipeline
    base += [f"data.image_size={p.image_size}", f"data.eval_resize={json.dumps(p.eval_resize)}",
             f"data.mean={json.dumps(list(p.mean))}", f"data.std={json.dumps(list(p.std))}"]
    return load_recipe(recipe_path, base + list(overrides))


def evaluation_split(recipe: Recipe, input_size: int) -> tuple[EvalSet, list[str]]:
    """(the test split as the run's own evaluation reads it, the data's class names), on this one process, at
    the recipe's data.image_size, data.eval_resize, data.mean and data.std."""
    from alexdist.data.choice import choose_loader

    d = recipe.data
    mean, std = tuple(d.mean), tuple(d.std)
    if choose_loader(d, recipe.augment, 1)[0] == "stream":
        from alexdist.data.choice import default_workers
        from alexdist.data.index import build_index, index_file, load_index
        from alexdist.data.streamed import StreamEvalSet

        if not index_file(d).is_file():
            print(f"alexdist: indexing {d.source} (once; `alexdist index` does it ahead)", file=sys.stderr, flush=True)
            build_index(d, progress=True)
        index = load_index(d)
        workers = default_workers(1) if d.workers is None else d.workers
        return StreamEvalSet(index.test, np.arange(len(index.test)), d.image_size, d.eval_resize, input_size,
                             torch.device("cpu"), workers, mean, std), index.classes
    from alexdist.data.batches import MemoryEvalSet
    from alexdist.data.cache import load_dataset

    ds = load_dataset(d)
    return MemoryEvalSet(ds.test_x, ds.test_y, input_size, mean, std), ds.classes


@torch.no_grad()
def evaluate_weights(path: str | Path, recipe_path: str | None = None, overrides: list[str] = (),
                     tta: str = "none") -> dict:
    weights, meta, _ = load_source(path)
    pipeline = pipeline_of(meta)
    recipe = _recipe(meta, pipeline, recipe_path, overrides)
    size = int(meta["input_size"])
    classes = classes_of(meta)
    model = build_model(recipe.model.name, size, 0.0, recipe.model.width_mult, num_classes=len(classes))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise DataError(
            f"'{path}' does not fit model {recipe.model.name} (missing {len(missing)}, unexpected {len(unexpected)} "
            f"tensors, e.g. {(missing or unexpected)[0]}); evaluate it with the model it was trained as"
        )
    test, data_classes = evaluation_split(recipe, size)
    if len(data_classes) != len(classes):
        raise DataError(f"'{path}' was trained on {len(classes)} classes, data.source={recipe.data.source} has "
                        f"{len(data_classes)}; evaluate it on the data it was trained for")
    ev = evaluate_ranks(None, model, test, recipe.train.eval_batch_size, torch.float32,
                        tta=tta, num_classes=len(classes))
    out = {"test_loss": ev.loss, "test_acc": ev.acc, "images": len(test), "model": recipe.model.name,
           "step": meta.get("step"), "classes": classes, "per_class_acc": ev.per_class_acc(),
           "confusion": ev.confusion}
    if ev.acc5 is not None:  # more than 10 classes: top-5 beside top-1, as the run reported it
        out["test_acc5"] = ev.acc5
    if tta != "none":
        out.update(tta=tta, tta_loss=ev.tta_loss, tta_acc=ev.tta_acc)
    return out


def report(r: dict) -> str:
    """The result as a user reads it: the totals, then accuracy and the commonest confusion per class."""
    top5 = f" top-5 {r['test_acc5']:.4f}" if r.get("test_acc5") is not None else ""
    lines = [f"{r['model']} step {r['step']}: test loss {r['test_loss']:.4f} acc {r['test_acc']:.4f}{top5} "
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
    run.summary.update({"test/acc": result["test_acc"], "test/loss": result["test_loss"], "images": result["images"],
                        **({"test/acc5": result["test_acc5"]} if "test_acc5" in result else {})})
    run.finish()
