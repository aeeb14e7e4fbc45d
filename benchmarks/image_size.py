"""The 227 px AlexNet: data stored at 32 px and upsampled on the device per batch (data.image_size=32, the
default) against data resized once at decode time and stored at 227 px (data.image_size=227).

    .venv/bin/python benchmarks/image_size.py      # -> benchmarks/results/image_size.{json,md}

Both in one run on this machine: (1) the batch pipeline alone (augmentation, normalisation, upsampling when the
data is 32 px), images/s; (2) the real loop (`python -m alexdist.train`, alexnet x0.25 at 227 px on real
digits), images/s from its own step times, first step excluded; (3) the memory the stored dataset and the
training copies take. Upsampling 32 -> 227 on the device happens per batch; stored at 227 the dataset takes
(227/32)^2 = 50x the memory (CIFAR-10 train: 7.7 GB of uint8, plus the training copies).
"""

from __future__ import annotations

import time

import torch
from common import steady_images_per_s, train_run, write

BATCH, N = 64, 1_024


def pipeline_ips(size: int) -> float:
    from alexdist.config import AugmentConfig
    from alexdist.data.batches import TrainBatches
    from alexdist.data.dataset import resize

    g = torch.Generator().manual_seed(0)
    x = resize(torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=g), size)
    y = torch.randint(0, 10, (N,), generator=g)
    tb = TrainBatches(x, y, BATCH, 1, 0, 1, 0, AugmentConfig(), 227)
    t0, n = time.perf_counter(), 0
    for micro in tb.epoch(0):
        for xb, _ in micro:
            n += len(xb)
    return n / (time.perf_counter() - t0)


def main() -> None:
    rows = {}
    for size in (32, 227):
        run = train_run(["model.name=alexnet", "model.input_size=227", "model.width_mult=0.25",
                         f"data.image_size={size}", "train.batch_size=32", "train.max_steps=12",
                         "train.log_every=1", "checkpoint.at_epoch_end=false", "eval.confusion_png=false"])
        rows[size] = {"pipeline_images_per_s": pipeline_ips(size), "train_images_per_s": steady_images_per_s(run),
                      "stored_mib_digits": 1797 * 3 * size * size / 2**20,
                      "stored_mib_cifar10_train": 50_000 * 3 * size * size / 2**20}
    ratio = rows[227]["train_images_per_s"] / rows[32]["train_images_per_s"]
    lines = ["| stored at | batch pipeline (img/s) | training, alexnet x0.25 @ 227 (img/s) | digits in memory (MiB) "
             "| CIFAR-10 train in memory (MiB) |", "|---|---|---|---|---|"]
    for size, r in rows.items():
        lines.append(f"| {size} px | {r['pipeline_images_per_s']:,.0f} | {r['train_images_per_s']:,.1f} | "
                     f"{r['stored_mib_digits']:,.0f} | {r['stored_mib_cifar10_train']:,.0f} |")
    lines += ["", f"Training at 227 px from data stored at 227 px runs at {ratio:.2f}x the speed of upsampling "
                  f"32 px data on the device, in the same run."]
    write("image_size", {"rows": rows, "train_ratio_227_over_32": ratio}, lines,
          "python benchmarks/image_size.py")


if __name__ == "__main__":
    main()
