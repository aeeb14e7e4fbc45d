"""An index of ImageNet's size (alexdist/data/index.py): build seconds, load seconds and resident bytes of the loaded
index, for 1,280,000 train entries in 1,000 class folders plus 50,000 val entries, as in ImageNet-1k.

    nice -n 10 .venv/bin/python benchmarks/index_scale.py [--dir DIR] [--workers N]
    # -> benchmarks/results/index_scale.{json,md}

The entries point at repeated files: 1,000 small JPEGs (crops of the two photos scikit-learn ships), each listed
1,330 times through hard links in an ImageNet-layout folder. Hard links rather than symlinks or a repeated listing
given to the builder: each entry is then a directory entry of its own that the real `alexdist index` path lists,
stats, opens and checks, as it would a real file (only the page cache is kinder: 1,000 distinct files, so the
reads are from memory; on a cold disk or a network file system the check is bound by the latency of two small
reads per file). Goals (issue 39): build <= 2 min, load <= 2 s, <= 100 MB resident.

The build runs in a fresh process (its CPU time, all worker processes included, beside the wall time and the
machine's load average, as other work on the machine stretches the wall time), then again with nothing changed.
Load and residency are measured in another fresh process: the time of load_index, and the process's resident set
(VmRSS) added by loading, then after touching every page of every array (what a loader worker holds at most;
the pages are the page cache's, shared by every worker that maps them).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, FILES = 1000, 1280, 50, 1000

LOAD_CHILD = """
import json, sys, time
import numpy as np
from alexdist.config import DataConfig
from alexdist.data.index import load_index

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))

cfg = DataConfig(source=sys.argv[1], cache_dir=sys.argv[2])
before = rss()
t0 = time.perf_counter()
idx = load_index(cfg)
load_s = time.perf_counter() - t0
loaded = rss()
arrays = [getattr(s, k) for s in (idx.train, idx.test) for k in ("labels", "file_ids", "lengths", "offsets", "names",
          "name_ends", "rows") if getattr(s, k) is not None]
touched_sum = sum(int(np.asarray(a).sum(dtype=np.int64) & 1) for a in arrays)
touched = rss()
t0 = time.perf_counter()
rng = np.random.default_rng(0)
picks = rng.integers(0, len(idx.train), 2000)
nbytes = sum(len(idx.train.read(int(i))) for i in picks)
read_s = time.perf_counter() - t0
print(json.dumps({"load_s": load_s, "rss_added_by_load": loaded - before, "rss_added_touching_all": touched - before,
                  "array_bytes": sum(a.nbytes for a in arrays), "train": len(idx.train), "test": len(idx.test),
                  "random_reads_per_s": len(picks) / read_s, "bytes_read": nbytes}))
"""


def make_files(folder: Path) -> list[Path]:
    """1,000 distinct small JPEGs: 96 x 72 crops of china.jpg and flower.jpg at spread-out positions."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    folder.mkdir(parents=True)
    photos = [load_sample_image(n) for n in ("china.jpg", "flower.jpg")]
    out = []
    for k in range(FILES):
        photo = photos[k % 2]
        y, x = (k * 37) % (photo.shape[0] - 72), (k * 53) % (photo.shape[1] - 96)
        path = folder / f"{k:04d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(photo[y:y + 72, x:x + 96]).save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue())
        out.append(path)
    return out


def make_tree(root: Path, classes: int) -> dict:
    """train/cNNNN/*.JPEG and val/cNNNN/*.JPEG as hard links to the 1,000 files; returns sizes and seconds."""
    t0 = time.perf_counter()
    files = make_files(root.parent / f"{root.name}-files")
    n = 0
    for split, per in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(classes):
            folder = root / split / f"c{c:04d}"
            folder.mkdir(parents=True)
            for k in range(per):
                os.link(files[(c * 7 + k) % FILES], folder / f"c{c:04d}_{k:05d}.JPEG")
                n += 1
    return {"links": n, "distinct_files": FILES, "file_bytes_mean": sum(f.stat().st_size for f in files) / FILES,
            "make_s": time.perf_counter() - t0}


BUILD_CHILD = """
import json, os, resource, sys, time
from alexdist.config import DataConfig
from alexdist.data.index import build_index

def cpu():
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
               resource.RUSAGE_CHILDREN)))

cfg = DataConfig(source=sys.argv[1], cache_dir=sys.argv[2], workers=int(sys.argv[3]))
load_before, t0, c0 = os.getloadavg()[0], time.perf_counter(), cpu()
idx = build_index(cfg, progress=False)
build_s, build_cpu, load_after = time.perf_counter() - t0, cpu() - c0, os.getloadavg()[0]
t0 = time.perf_counter()
again = build_index(cfg, progress=False)
rerun_s = time.perf_counter() - t0
assert again.fingerprint == idx.fingerprint
gen = next(idx.path.parent.glob("gen-*"))
print(json.dumps({"build_s": build_s, "build_cpu_s": build_cpu, "load_average": [load_before, load_after],
                  "rerun_unchanged_s": rerun_s, "train": len(idx.train), "test": len(idx.test),
                  "classes": len(idx.classes), "index_bytes_on_disk": sum(f.stat().st_size for f in gen.iterdir()),
                  "peak_rss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "mean": idx.mean, "std": idx.std}))
"""


def child(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "alexdist-index-scale"))
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--keep", action="store_true", help="keep the generated tree")
    ap.add_argument("--classes", type=int, default=CLASSES, help="fewer for a quick try (results not written)")
    args = ap.parse_args()
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    root, cache = base / "imagenet-like", base / "cache"
    try:
        tree = make_tree(root, args.classes)
        built = child(BUILD_CHILD, str(root), str(cache), str(args.workers))
        built["workers"] = args.workers
        loaded = child(LOAD_CHILD, str(root), str(cache))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if args.classes != CLASSES:
        print(json.dumps({"tree": tree, "build": built, "load": loaded}, indent=1))
        return
    report(tree, built, loaded, args.workers)


def report(tree: dict, built: dict, loaded: dict, workers: int) -> None:
    mb, n = 1e6, built["train"] + built["test"]
    lines = [
        f"{built['train']:,} train + {built['test']:,} val entries in {built['classes']:,} class folders "
        f"(ImageNet-1k's shape), hard links to {tree['distinct_files']:,} JPEGs of "
        f"{tree['file_bytes_mean'] / 1e3:.1f} kB (page cache warm); `build_index` with {workers} worker processes.", "",
        "| measure | figure | goal |", "|---|---|---|",
        f"| build (list, stat, check every image, write) | {built['build_s']:.1f} s (load average "
        f"{built['load_average'][0]:.1f} -> {built['load_average'][1]:.1f} on {os.cpu_count()} cores) | <= 120 s |",
        f"| CPU time of the build, all processes | {built['build_cpu_s']:.1f} s (/ {workers} workers: "
        f"{built['build_cpu_s'] / workers:.1f} s) | |",
        f"| build again, nothing changed (list and stat only) | {built['rerun_unchanged_s']:.1f} s | |",
        f"| load (fresh process) | {loaded['load_s'] * 1e3:.1f} ms | <= 2 s |",
        f"| resident after load | {loaded['rss_added_by_load'] / mb:.1f} MB | |",
        f"| resident after touching every array page | {loaded['rss_added_touching_all'] / mb:.1f} MB "
        f"({loaded['rss_added_touching_all'] / n:.1f} B/entry) | <= 100 MB |",
        f"| index arrays | {loaded['array_bytes'] / mb:.1f} MB ({loaded['array_bytes'] / n:.1f} B/entry); "
        f"{built['index_bytes_on_disk'] / mb:.1f} MB on disk | |",
        f"| peak RSS of the building process (torchvision's import included) | "
        f"{built['peak_rss_main'] / mb:.0f} MB | |",
        f"| random reads (2,000, one pread each) | {loaded['random_reads_per_s']:,.0f} /s | |", "",
        f"Generating the tree ({tree['links']:,} hard links) took {tree['make_s']:.0f} s, not counted. Measured mean "
        f"{tuple(round(v, 3) for v in built['mean'])}, std {tuple(round(v, 3) for v in built['std'])}.",
    ]
    write("index_scale", {"tree": tree, "build": built, "load": loaded}, lines,
          "nice -n 10 .venv/bin/python benchmarks/index_scale.py")


if __name__ == "__main__":
    main()
