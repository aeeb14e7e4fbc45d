"""The GPU check's ImageNet-size row: images/s per GPU of the imagenet_alexnet_bn_lars recipe's step at 224 px,
streamed from disk (JPEGs decoded by the loader workers, RandomResizedCrop) against the same step fed from memory
(decoded images on the device). Equal figures: the model bounds a step; a lower streamed figure: the loader does,
and more cores per GPU (data.workers), a faster decoder or smaller files would pay.

The JPEGs are made here, photo-like (smooth colour fields with grain, ImageNet's usual 500 x 375, ~85 KB),
written just before the run: they are read from the page cache, so the streamed figure is the decode's and the
crop's, not a disk's. A cold network file system can only be slower. On the CPU dry run: a few files, x0.25 width.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from common import ROOT, error_line

from alexdist.distributed.launcher import launch_command
from alexdist.distributed.processes import run_bounded

if TYPE_CHECKING:
    from gpu_plan import Row, Setting

SIZE, DISTINCT, CLASSES = 224, 32, 16
# (per-GPU batch, optimizer steps per epoch): the paper's 8,192 on 32 GPUs is 256 per GPU.
SHAPE = {"cuda": (256, 20), "cpu": (8, 3)}


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    """A JPEG that compresses and decodes like a photo (random noise takes several times the bytes): a coarse
    random colour field upsampled smoothly, plus sensor grain."""
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8))
    arr = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    arr = arr + rng.normal(0, 6, arr.shape).round().astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def imagenet_folder(root: Path, n_train: int, n_val: int) -> Path:
    """ImageNet's folder layout (train/CLASS/*.JPEG, val/CLASS/*.JPEG) of n_train + n_val files, each a copy of
    one of DISTINCT photo-like JPEGs (making each anew would take longer than the row's runs)."""
    rng = np.random.default_rng(0)
    blobs = [photo_like(rng, *((500, 375) if i % 3 else (375, 500))) for i in range(DISTINCT)]
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = root / split / f"n{i % CLASSES:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{i:06d}.JPEG").write_bytes(blobs[i % DISTINCT])
    return root


def _args(s: Setting, precision: str, batch: int, out: Path, data: list[str]) -> list[str]:
    return ["imagenet_alexnet_bn_lars", *data, f"data.image_size={SIZE}", f"model.input_size={SIZE}",
            f"train.global_batch={batch}", "train.epochs=2", f"model.width_mult={s.width}", f"precision={precision}",
            "train.log_every=0", "checkpoint.at_epoch_end=false", "tracking.wandb=false", f"output_dir={out}"]


def _second_epoch(proc, out: Path) -> dict:
    if proc.returncode != 0:
        return {"exit": proc.returncode, "error": error_line(proc.stderr)}
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    train = [e for e in events if e["event"] == "train"][-1]
    return {"images_per_s": train["images_per_s"], "loss": train["loss"],
            "peak_memory_gib": (summary.get("peak_memory_bytes") or 0) / 2**30,
            "data_workers": summary.get("data_workers")}


def imagenet_row(s: Setting, row: Row, env: dict, timeout: int) -> dict:
    """Index a generated ImageNet-layout folder, then two epochs of the recipe's step streamed from it and two
    from memory (synthetic images at the same size); img/s of each run's second epoch."""
    batch, steps = SHAPE[s.device]
    deadline = time.time() + timeout
    with tempfile.TemporaryDirectory() as tmp:
        root = imagenet_folder(Path(tmp) / "imagenet", batch * steps, 2 * batch)
        cache = ["--cache-dir", f"{tmp}/cache"]
        proc = run_bounded([sys.executable, "-m", "alexdist", "index", str(root), *cache, "--quiet"],
                           int(deadline - time.time()), cwd=ROOT, env=env)
        if proc.returncode != 0:
            return {"exit": proc.returncode, "error": error_line(proc.stderr)}
        runs = {
            "stream": [f"data.source={root}", f"data.cache_dir={tmp}/cache"],
            "memory": ["data.source=synthetic", f"data.synthetic_train={batch * steps}",
                       f"data.synthetic_test={2 * batch}", "data.loader=memory", "augment.random_resized_crop=false",
                       "data.eval_resize=null", "augment.crop_padding=0"],
        }
        result = {}
        for name, data in runs.items():
            out = Path(tmp) / name
            args = _args(s, row.precision, batch, out, data + row.options)
            proc = run_bounded(launch_command(args, 1, row.launcher), int(deadline - time.time()), cwd=ROOT, env=env)
            result[name] = _second_epoch(proc, out)
            if "error" in result[name]:
                return {**result[name], "error": f"{name}: {result[name]['error']}"}
    stream, memory = result["stream"], result["memory"]
    ratio = stream["images_per_s"] / memory["images_per_s"]
    return {"stream_images_per_s": round(stream["images_per_s"], 1),
            "memory_images_per_s": round(memory["images_per_s"], 1), "stream_to_memory": round(ratio, 3),
            # Within 10 %: the step's own time dominates; below: the loader's workers cannot keep up.
            "bound_by": "model" if ratio >= 0.9 else "loader", "data_workers": stream["data_workers"],
            "batch": batch, "image_size": SIZE, "peak_memory_gib": memory["peak_memory_gib"],
            "loss": stream["loss"]}


def fmt_imagenet(name: str, r: dict) -> str:
    """The row's line in gpu_check.md."""
    return (f"| {name} | {r['stream_images_per_s']:,.0f} img/s streamed, {r['memory_images_per_s']:,.0f} from "
            f"memory | | {r['peak_memory_gib']:.2f} | {r['loss']:.3f} | streamed / memory {r['stream_to_memory']:.2f}:"
            f" the {r['bound_by']} bounds a step ({r['data_workers']} loader workers, batch {r['batch']}, "
            f"{r['image_size']} px) |")
