"""Images/s of alexdist's on-device batched augmentation vs a torchvision DataLoader with PIL transforms.

    .venv/bin/python benchmarks/data_pipeline.py      # -> benchmarks/results/data_pipeline.{json,md}

Both pipelines produce the same thing from the same uint8 CIFAR-shaped images: a random 32x32 crop of the image
zero-padded by 4, a random horizontal flip, normalisation, batches of 256 in a shuffled order (and, second
case, bilinear upsampling to 227 px). torchvision: `RandomCrop(32, padding=4)`, `RandomHorizontalFlip`,
`ToTensor`, `Normalize` (+ `Resize(227)`) over PIL images with a 2-worker DataLoader. alexdist: `TrainBatches`
over the tensors in memory, on this machine's CPU (the training device here).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
N, BATCH = 10_000, 256


def alexdist_ips(x: torch.Tensor, y: torch.Tensor, size: int) -> float:
    from alexdist.config import AugmentConfig
    from alexdist.data.batches import TrainBatches

    tb = TrainBatches(x, y, BATCH, 1, 0, 1, 0, AugmentConfig(), size)
    t0 = time.perf_counter()
    n = 0
    for micro in tb.epoch(0):
        for xb, _ in micro:
            n += len(xb)
    return n / (time.perf_counter() - t0)


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def torchvision_ips(x: np.ndarray, y: np.ndarray, size: int) -> float:
    from torchvision import transforms as T

    from alexdist.data.batches import CIFAR_MEAN, CIFAR_STD

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if size != 32:
        steps.append(T.Resize(size))
    steps += [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    loader = torch.utils.data.DataLoader(_PILDataset(x, y, T.Compose(steps)), batch_size=BATCH, shuffle=True,
                                         num_workers=2, drop_last=True, persistent_workers=False)
    t0 = time.perf_counter()
    n = 0
    for xb, _ in loader:
        n += len(xb)
    return n / (time.perf_counter() - t0)


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import machine

    g = np.random.default_rng(0)
    x_np = g.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    y_np = g.integers(0, 10, N)
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(y_np)
    results = {"_machine": machine(), "images": N, "batch": BATCH, "threads": torch.get_num_threads()}
    for size in (32, 227):
        a = max(alexdist_ips(x, y, size) for _ in range(3))
        t = max(torchvision_ips(x_np, y_np, size) for _ in range(2))
        results[f"{size}px"] = {"alexdist_images_per_s": a, "torchvision_images_per_s": t, "ratio": a / t}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_pipeline.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["_machine"]
    lines = ["# data_pipeline", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}; commit {m['git_commit']}. "
             "Command: `.venv/bin/python benchmarks/data_pipeline.py`.", "",
             f"{N} CIFAR-shaped images, batch {BATCH}; best of 3 (alexdist) / 2 (torchvision) epochs.", "",
             "| output | alexdist (img/s) | torchvision + PIL, 2 workers (img/s) | ratio |", "|---|---|---|---|"]
    for size in (32, 227):
        r = results[f"{size}px"]
        lines.append(f"| {size} px | {r['alexdist_images_per_s']:,.0f} | {r['torchvision_images_per_s']:,.0f} | "
                     f"{r['ratio']:.1f}x |")
    (RESULTS / "data_pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
