"""`alexdist predict`: the top classes of image files, from a weights file.

    alexdist predict cat.png truck.jpg --weights runs/bn/model.safetensors --top-k 3

Any size and mode PIL reads (PNG, JPEG, ...): each image is converted to RGB and resized to 32x32, the size the
models are trained at (CIFAR-10's), then goes through the evaluation's own normalisation (and upsampling, for
the 227 px AlexNet). Class names come from the weights' metadata.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from alexdist.batches import normalize
from alexdist.errors import DataError, run_command
from alexdist.weights import classes_of, load_weights, model_for

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
    weights, meta = load_weights(weights_path)
    size = int(meta["input_size"])
    model, classes = model_for(meta, weights), classes_of(meta)
    x = torch.stack([read_image(p) for p in images])  # every file read before any work: one bad file, one line
    probs = torch.softmax(model(normalize(x, size)).float(), dim=1)
    k = min(top_k, len(classes))
    top = probs.topk(k, dim=1)
    return [{"image": str(p), "top": [{"class": classes[i], "prob": v} for v, i in
                                      zip(top.values[n].tolist(), top.indices[n].tolist(), strict=True)]}
            for n, p in enumerate(images)]


def main(argv: list[str] | None = None, prog: str = "python -m alexdist.predict") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    ap.add_argument("--weights", required=True, help="a weights file (a run's model.safetensors or an export)")
    ap.add_argument("--top-k", type=int, default=3, help="how many classes to show per image (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per image")
    args = ap.parse_args(argv)

    def body() -> int:
        for r in predict(args.images, args.weights, args.top_k):
            if args.json:
                print(json.dumps(r))
            else:
                print(f"{r['image']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
        return 0

    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
