"""Predicting (`alexdist predict`): the top classes of image files, from weights.

Any size and mode PIL reads (PNG, JPEG, ...): each image is converted to RGB and resized to 32x32, the size the
models are trained at (CIFAR-10's), then goes through the evaluation's own normalisation (and upsampling, for
the 227 px AlexNet). Class names come from the weights' metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alexdist.artifacts.export import load_source
from alexdist.checkpoint.weights import classes_of, model_for
from alexdist.data.batches import normalize
from alexdist.errors import DataError

TRAIN_SIZE = 32  # every dataset alexdist trains on is stored as 32x32 images


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 (3, 32, 32) from an image file; DataError naming the file if it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((TRAIN_SIZE, TRAIN_SIZE), Image.Resampling.BILINEAR)
            return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(TRAIN_SIZE, TRAIN_SIZE, 3) \
                .permute(2, 0, 1).contiguous()
    except FileNotFoundError:
        raise DataError(f"image '{path}' does not exist; give the path of a PNG or JPEG file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"'{path}' is not a readable image ({type(exc).__name__}); give a PNG or JPEG file") from None


@torch.no_grad()
def predict(images: list[str], weights_path: str, top_k: int = 3) -> list[dict]:
    """For each image: its top-k classes with softmax probabilities, most probable first."""
    weights, meta, _ = load_source(weights_path)
    size = int(meta["input_size"])
    model, classes = model_for(meta, weights), classes_of(meta)
    x = torch.stack([read_image(p) for p in images])  # every file read before any work: one bad file, one line
    probs = torch.softmax(model(normalize(x, size)).float(), dim=1)
    k = min(top_k, len(classes))
    top = probs.topk(k, dim=1)
    return [{"image": str(p), "top": [{"class": classes[i], "prob": v} for v, i in
                                      zip(top.values[n].tolist(), top.indices[n].tolist(), strict=True)]}
            for n, p in enumerate(images)]
