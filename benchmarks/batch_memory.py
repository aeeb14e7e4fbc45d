"""Peak memory of building the training batches (data/batches.TrainBatches) at 32, 64 and 224 px, against the
way they were built before (the images kept beside a zero-padded copy and the stacked padded + mirrored pair).

    .venv/bin/python benchmarks/batch_memory.py      # -> benchmarks/results/batch_memory.{json,md}

Each measurement runs in a fresh process: the peak resident set size (ru_maxrss) while the batches are built,
less the process's size just before, for N images of random uint8 pixels, padding 4, flips on; beside the
bytes the kept source takes by formula (batches.source_bytes). On a GPU the same copies sit in device memory,
which run_data.check_memory checks before building. Scaled to CIFAR-10's 45,000 training images.
"""

from __future__ import annotations

import json
import subprocess
import sys

from common import ROOT, write

N = 2_000
CHILD = """
import json, resource, sys, torch, torch.nn.functional as F
from alexdist.config import AugmentConfig
from alexdist.data.batches import TrainBatches
n, size, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
y = torch.zeros(n, dtype=torch.int64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if how == "now":
    kept = TrainBatches(x, y, 8, 1, 0, 1, 0, AugmentConfig(), size)
else:  # before: F.pad, then torch.stack of the padded images and their mirror, with the images kept
    padded = F.pad(x, (4,) * 4)
    kept = torch.stack([padded, padded.flip(-1)]).contiguous()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_extra_bytes": peak - before}))
"""


def measure(size: int, how: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, str(N), str(size), how], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]


def main() -> None:
    from alexdist.data.batches import source_bytes

    rows, mib = {}, 2**20
    for size in (32, 64, 224):
        rows[size] = {"source_bytes": source_bytes(N, size, 4, True), "peak_now": measure(size, "now"),
                      "peak_before": measure(size, "before"), "images_bytes": N * 3 * size * size}
    lines = [f"{N:,} images, padding 4, flips on; peak resident memory added while building (MiB):", "",
             "| size | images | kept source (formula) | peak now | peak before | before / now | CIFAR-10 train "
             "(45k) now, GiB |", "|---|---|---|---|---|---|---|"]
    for size, r in rows.items():
        lines.append(f"| {size} px | {r['images_bytes'] / mib:,.1f} | {r['source_bytes'] / mib:,.1f} | "
                     f"{r['peak_now'] / mib:,.1f} | {r['peak_before'] / mib:,.1f} | "
                     f"{r['peak_before'] / r['peak_now']:.2f} | {r['peak_now'] * 45_000 / N / 2**30:,.1f} |")
    write("batch_memory", {"n_images": N, "rows": rows}, lines, "python benchmarks/batch_memory.py")


if __name__ == "__main__":
    main()
