"""Predicting (`alexdist predict`): the top classes of image files, from weights.

Any size and mode PIL reads (PNG, JPEG, ...): each image goes through the input pipeline its weights record
(checkpoint.weights.Pipeline), the run's own evaluation: converted to RGB, resized (the shorter side to the
evaluation resize, then the centre crop; or the whole image to the run's image size), normalised with the run's
mean and std, upsampled where the model wants larger inputs. Class names come from the weights' metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alexdist.artifacts.export import load_source
from alexdist.checkpoint.weights import Pipeline, classes_of, model_for, pipeline_of
from alexdist.data.batches import normalize
from alexdist.data.decode import decode_eval
from alexdist.errors import DataError


def read_image(path: str | Path, pipeline: Pipeline) -> torch.Tensor:
    """uint8 (3, S, S) of an image file as the run's evaluation decodes it (S: pipeline.image_size); DataError
    naming the file if it is missing or not a readable image."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"image '{path}' does not exist; give the path of a PNG or JPEG file") from None
    except OSError as exc:
        raise DataError(f"'{path}' is not a readable image ({type(exc).__name__}); give a PNG or JPEG file") from None
    try:
        return decode_eval(data, pipeline.image_size, pipeline.eval_resize, name=str(path))
    except DataError as exc:  # its fix speaks of an indexed data set: keep the reason, give predict's fix
        raise DataError(f"{str(exc).rsplit('; ', 1)[0]}; give a PNG or JPEG file") from None


def preprocess(images: list[str | Path], pipeline: Pipeline) -> torch.Tensor:
    """The model's input for image files: float (N, 3, input_size, input_size), every file read before any work
    (one bad file, one line)."""
    x = torch.stack([read_image(p, pipeline) for p in images])
    return normalize(x, pipeline.input_size, pipeline.mean, pipeline.std)


@torch.no_grad()
def predict(images: list[str], weights_path: str, top_k: int = 3) -> list[dict]:
    """For each image: its top-k classes with softmax probabilities, most probable first."""
    weights, meta, _ = load_source(weights_path)
    model, classes = model_for(meta, weights), classes_of(meta)
    probs = torch.softmax(model(preprocess(images, pipeline_of(meta))).float(), dim=1)
    k = min(top_k, len(classes))
    top = probs.topk(k, dim=1)
    return [{"image": str(p), "top": [{"class": classes[i], "prob": v} for v, i in
                                      zip(top.values[n].tolist(), top.indices[n].tolist(), strict=True)]}
            for n, p in enumerate(images)]
