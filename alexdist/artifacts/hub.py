"""A folder in the Hugging Face Hub's model layout, which `hf upload USER/REPO DIR .` publishes as it is:

    model.safetensors   the weights (alexdist.checkpoint.weights' format: metadata names the model, input size, classes)
    config.json         what rebuilding and feeding the model needs (architecture, width, input size, classes,
                        the input pipeline: image size, resize and centre crop, normalisation) plus its test results
    README.md           the model card: Hub metadata (YAML front matter), the recipe, the data, test accuracy
                        and a per-class table measured at export, the command that trained it, how to load it
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from huggingface_hub import ModelCardData

from alexdist import __version__
from alexdist.checkpoint.weights import pipeline_of, save_weights
from alexdist.fileio import atomic_write_text


def _run_dir(source: Path) -> Path:
    """The run directory a checkpoint or weights file comes from (its summary and config live there)."""
    return source.parent.parent if source.is_dir() else source.parent


def _training_facts(source: Path) -> tuple[dict, str | None]:
    """(recipe as a dict, the training command) from the run's files, when they are there."""
    run = _run_dir(source)
    recipe_file = source / "config.yaml" if source.is_dir() else run / "config.yaml"
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else {}
    command = None
    summary = run / "summary.json"
    if summary.is_file():
        command = json.loads(summary.read_text()).get("command")
    return recipe or {}, command


def write_hub_dir(source: str | Path, weights: dict[str, torch.Tensor], meta: dict[str, str], evaluation: dict,
                  out_dir: str | Path) -> Path:
    """Write the folder; `evaluation` is the result of `alexdist.artifacts.weights_evaluation.evaluate_weights`
    for these weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "model.safetensors", weights, meta)
    n_params = sum(v.numel() for k, v in weights.items() if not k.endswith(("running_mean", "running_var",
                                                                           "num_batches_tracked")))
    recipe, command = _training_facts(Path(source))
    p = pipeline_of(meta)
    config = {
        "library_name": "alexdist", "alexdist_version": __version__, "architecture": meta["model"],
        "input_size": p.input_size, "width_mult": float(meta["width_mult"]),
        "num_classes": len(evaluation["classes"]), "classes": evaluation["classes"],
        "image_size": p.image_size, "eval_resize": p.eval_resize,
        "normalization": {"mean": list(p.mean), "std": list(p.std), "scale": "pixels / 255, then (x - mean) / std"},
        "parameters": n_params, "step": int(meta["step"]), "data": json.loads(meta.get("data", "{}")),
        "test_accuracy": evaluation["test_acc"], "test_loss": evaluation["test_loss"],
        "test_images": evaluation["images"],
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / "README.md", model_card(config, evaluation, recipe, command))
    return out


def model_card(config: dict, evaluation: dict, recipe: dict, command: str | None) -> str:
    source = config["data"].get("source", "")
    hub_data = "/" in source and not Path(source).exists()  # a Hub dataset id, e.g. uoft-cs/cifar10
    front = ModelCardData(library_name="alexdist", pipeline_tag="image-classification", metrics=["accuracy"],
                          tags=["image-classification", config["architecture"], "alexdist"],
                          datasets=[source] if hub_data else None)
    rows = "\n".join(f"| {c} | {a:.4f} | {sum(evaluation['confusion'][i])} |"
                     for i, (c, a) in enumerate(zip(evaluation["classes"], evaluation["per_class_acc"], strict=True)))
    recipe_yaml = yaml.safe_dump(recipe, sort_keys=False).strip() if recipe else "(not found beside the weights)"
    return f"""---
{front.to_yaml()}
---

# {config['architecture']} ({config['parameters']:,} parameters), trained with alexdist

{config['architecture']} at {config['input_size']} px, width ×{config['width_mult']}, trained on `{source}` for
{config['step']} optimizer steps. Test accuracy **{config['test_accuracy']:.4f}** (loss {config['test_loss']:.4f})
on {config['test_images']} test images, measured by `alexdist evaluate` when this folder was written.

## Per-class accuracy

| class | accuracy | images |
|---|---|---|
{rows}

## How it was trained

```bash
{command or '(the training command was not recorded beside these weights)'}
```

The recipe (alexdist's resolved config):

```yaml
{recipe_yaml}
```

## Use

{usage(config)}

or `alexdist predict IMAGE --weights model.safetensors`. Class order: {', '.join(config['classes'])}.
"""


def usage(config: dict) -> str:
    """The card's code: load the weights, and feed them as the run's own evaluation did (its stored pipeline)."""
    size, resize = config["image_size"], config["eval_resize"]
    crop, how = ((f"T.Resize({resize}), T.CenterCrop({size})",
                  f"the shorter side resized to {resize} px, the centre {size} x {size} kept") if resize is not None
                 else (f"T.Resize(({size}, {size}))", f"the whole image resized to {size} x {size}"))
    n = config["input_size"]
    upsample = "" if n == size else f",\n                        T.Resize(({n}, {n}), antialias=False)"
    norm = config["normalization"]
    return f"""```python
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import v2 as T
from alexdist.models import build_model

model = build_model("{config['architecture']}", {config['input_size']}, width_mult={config['width_mult']},
                    num_classes={config['num_classes']})
model.load_state_dict(load_file("model.safetensors"))
model.eval()
# The input pipeline of the run's own evaluation: RGB, {how},
# pixels / 255 normalised with mean {norm['mean']} and std {norm['std']}
preprocess = T.Compose([T.ToImage(), {crop},
                        T.ToDtype(torch.float32, scale=True),
                        T.Normalize(mean={norm['mean']}, std={norm['std']}){upsample}])
with torch.no_grad():
    logits = model(preprocess(Image.open("cat.jpg").convert("RGB")).unsqueeze(0))
```"""
