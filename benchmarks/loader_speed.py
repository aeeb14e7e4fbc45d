"""Images/s of the streamed loader users run (alexdist/data/streamed.py's StreamBatches and StreamEvalSet over
an index of the files, 2 loader workers) against torchvision's ImageFolder + PIL + DataLoader with the same 2
workers, on the same JPEG files, at the model's input (normalized float batches), after a warm-up; and the raw
Pillow decode rate of those files on the same cores.

    nice -n 10 .venv/bin/python benchmarks/loader_speed.py   # -> benchmarks/results/loader_speed.{json,md}

The files are photo-like and ImageNet-sized, made offline: random crops of the two photos scikit-learn ships
(china.jpg, flower.jpg) at ImageNet's usual sizes (500 x 375 and its kin), with mild grain, JPEG quality 95:
~85 KB a file, in the ImageNet folder layout (train/CLASS/*.JPEG).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = Path(os.environ.get("LOADER_SPEED_DATA", "/tmp/alexdist-loader-speed"))
FILES, CLASSES, BATCH, WORKERS = 512, 8, 64, 2
PASSES, WARMUP_BATCHES = 4, 4  # images timed per pipeline: PASSES * FILES - WARMUP_BATCHES * BATCH
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = [((500, 375), 50), ((375, 500), 20), ((500, 333), 15), ((500, 500), 10), ((640, 427), 5)]


def make_images(root: Path, n: int = FILES, classes: int = CLASSES, seed: int = 0) -> list[Path]:
    """n JPEGs in root/train/CLASS/, one a class linked into root/val/CLASS/ (made once; kept for later runs)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    paths = [root / "train" / f"n{i % classes:08d}" / f"img_{i:05d}.JPEG" for i in range(n)]
    if all(p.is_file() for p in paths) and (root / "val").is_dir():
        return paths
    g = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 640 x 427 each
    shapes, weights = zip(*SIZES, strict=True)
    for i, path in enumerate(paths):
        src, out = photos[i % 2], shapes[g.choice(len(shapes), p=np.array(weights) / sum(weights))]
        zoom = g.uniform(1.0, 1.25)
        cw, ch = min(int(out[0] / zoom), src.width), min(int(out[1] / zoom), src.height)
        left, top = g.integers(0, src.width - cw + 1), g.integers(0, src.height - ch + 1)
        arr = np.asarray(src.crop((left, top, left + cw, top + ch)).resize(out, Image.BICUBIC), dtype=np.int16)
        arr = arr + g.normal(0, 2, arr.shape).round().astype(np.int16)  # sensor grain: ImageNet-like file sizes
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=95)
    for path in paths[:classes]:  # the index wants a test split: one image a class, linked
        val = root / "val" / path.parent.name / path.name
        val.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, val)
    return paths


def index(paths: list[Path]):
    """The streamed path's index of the files (built once, under DATA's cache; kept for later runs)."""
    from alexdist.config import DataConfig
    from alexdist.data.index import build_index

    return build_index(DataConfig(source=str(DATA), cache_dir=str(DATA.parent / f"{DATA.name}-cache"), workers=0),
                       progress=False)


def entries(n: int) -> np.ndarray:
    """PASSES passes over the n files as one epoch's entries (an entry may repeat): one loader pass, so the
    workers never drain between epochs, as in an ImageNet epoch of thousands of steps."""
    return np.tile(np.arange(n), PASSES)


def shipped(paths: list[Path], size: int, train: bool, eval_resize: int | None):
    """alexdist's own streamed batches (alexdist/data/streamed.py) over the files, with WORKERS loader workers:
    (number of batches, an iterator of normalized float batches)."""
    from alexdist.config import AugmentConfig
    from alexdist.data.streamed import StreamBatches, StreamEvalSet

    idx, cpu, n = index(paths), torch.device("cpu"), len(paths) * PASSES
    if not train:
        ev = StreamEvalSet(idx.train, entries(len(paths)), size, eval_resize, size, cpu, WORKERS, MEAN, STD)
        return ev.n_batches(0, 1, BATCH), ev.batches(0, 1, BATCH)
    sb = StreamBatches(idx.train, entries(len(paths)), BATCH, 1, 0, 1, 0, AugmentConfig(random_resized_crop=True),
                       size, size, cpu, WORKERS, MEAN, STD)
    return n // BATCH, (xy for micro in sb.epoch(0) for xy in micro)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (the loader workers, a pool's processes):
    what a pipeline costs whatever else the machine runs, unlike its wall-clock rate."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def timed(last: int, batches) -> tuple[float, float]:
    """(images/s, CPU ms per image) of `last` batches after WARMUP_BATCHES batches (worker start, imports, first
    allocations), measured up to the last batch (before the workers exit). Each batch's pages are touched as a
    model's first layer would."""
    n = 0
    for b, (x, _) in enumerate(batches, 1):
        x.as_strided((x.numel() // 1024,), (1024,)).sum()  # one value a page (dense: any memory format)
        if b > WARMUP_BATCHES:
            n += len(x)
        if b == WARMUP_BATCHES:
            t0, c0 = time.perf_counter(), cpu_seconds()
        elif b == last:
            t1, c1 = time.perf_counter(), cpu_seconds()
    return n / (t1 - t0), 1e3 * (c1 - c0) / n


def ours(paths: list[Path], size: int, train: bool, eval_resize: int | None = None,
         pillow_only: bool = False) -> tuple[float, float]:
    from alexdist.data import decode

    cached = decode._simplejpeg
    if pillow_only:  # the workers fork from here, and so decode with Pillow too
        decode._simplejpeg = lambda: None
    try:
        return timed(*shipped(paths, size, train, eval_resize))
    finally:
        decode._simplejpeg = cached


def torchvision_ips(size: int, train: bool) -> tuple[float, float]:
    """torchvision's references/classification recipe: ImageFolder (PIL loader), per-image transforms, default
    collate of float tensors, 2 workers."""
    from torchvision import datasets
    from torchvision import transforms as T

    if train:
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    ds = datasets.ImageFolder(str(DATA / "train"), T.Compose([*steps, T.ToTensor(), T.Normalize(MEAN, STD)]))
    sampler = (torch.utils.data.RandomSampler(ds, num_samples=PASSES * len(ds)) if train
               else list(range(len(ds))) * PASSES)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=WORKERS,
                                         drop_last=True, prefetch_factor=2)
    return timed(len(loader), loader)


def _decode_files(args: tuple[list[str], int]) -> int:
    from PIL import Image

    paths, reduce = args
    for p in paths:
        with Image.open(p) as im:
            if reduce > 1:
                im.draft(im.mode, (im.width // reduce, im.height // reduce))
            im.convert("RGB")  # ImageFolder's loader: decode, RGB
    return len(paths)


def raw_decode_ips(paths: list[Path], reduce: int = 1) -> tuple[float, float]:
    """Pillow's decode alone, in WORKERS processes over PASSES passes of the files: the ceiling of a CPU loader.
    (images/s, CPU ms per image)."""
    names = [str(p) for p in paths] * PASSES
    chunks = [(names[i::WORKERS], reduce) for i in range(WORKERS)]
    with mp.get_context("fork").Pool(WORKERS) as pool:
        pool.map(_decode_files, [(c[:BATCH], reduce) for c, _ in chunks])  # warm-up
        t0, c0 = time.perf_counter(), cpu_seconds()
        n = sum(pool.map(_decode_files, chunks))
        return n / (time.perf_counter() - t0), 1e3 * (cpu_seconds() - c0) / n

def _cpu_ms(fn, n: int) -> float:
    """CPU ms per item of fn() over n items, best of 3."""
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return 1e3 * best / n


def stages(paths: list[Path], size: int = 224) -> dict:
    """Where the time goes at `size` px RandomResizedCrop, in one process and thread (cumulative CPU ms/img):
    each pipeline's steps, timed one after the other on 128 files."""
    from PIL import Image
    from torchvision import transforms as T

    from alexdist.config import AugmentConfig
    from alexdist.data.batches import normalize
    from alexdist.data.crops import rrc_params
    from alexdist.data.decode import _simplejpeg, decode_train
    from alexdist.data.streamed import _device_batch, _Reader

    split, aug, n = index(paths).train, AugmentConfig(random_resized_crop=True), 2 * BATCH
    data = [split.read(i) for i in range(n)]
    ds = _Reader(split, partial(decode_train, size=size, aug=aug), size, channels_last=True)
    batches = [(np.arange(b, b + BATCH), rrc_params(0, 0, np.arange(b, b + BATCH))) for b in (0, BATCH)]
    ids, params = np.arange(n), np.concatenate([p for _, p in batches])
    sj = _simplejpeg()
    full = (lambda d: sj.decode_jpeg(d, "RGB")) if sj else (lambda d: np.asarray(Image.open(io.BytesIO(d))))
    # Each step's outputs are dropped as made (as in a pipeline): keeping them all would time page faults.
    ours = {"decode (full size, to an array)": _cpu_ms(lambda: [full(data[i]) is None for i in ids], n),
            "+ crop, resize, flip (decode_train)": _cpu_ms(lambda: [decode_train(data[i], p, size, aug) is None
                                                                    for i, p in zip(ids, params, strict=True)], n),
            "+ file reads, the batch (uint8)": _cpu_ms(lambda: [ds[b] is None for b in batches], n)}
    xs = [ds[b] for b in batches]
    cpu = torch.device("cpu")
    ours["+ normalize (float)"] = ours["+ file reads, the batch (uint8)"] + _cpu_ms(
        lambda: [normalize(_device_batch(x, cpu)[0], size, MEAN, STD) is None for x in xs], n)
    images = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
    steps = [("+ RandomResizedCrop, flip", T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])),
             ("+ ToTensor", T.ToTensor()), ("+ Normalize", T.Normalize(MEAN, STD))]
    total = _cpu_ms(lambda: [Image.open(io.BytesIO(d)).convert("RGB") is None for d in data], n)
    theirs = {"open, decode, RGB (ImageFolder's loader)": total}
    for name, step in steps:
        total += _cpu_ms(lambda step=step, images=images: [step(im) is None for im in images], n)
        images = [step(im) for im in images]
        theirs[name] = total
    theirs["+ collate"] = total + _cpu_ms(lambda: [torch.stack(images[:BATCH]) is None,
                                                   torch.stack(images[BATCH:]) is None], n)
    return {"alexdist": ours, "torchvision": theirs}


def image_stack() -> dict:
    """The decoding libraries: Pillow (SIMD build or not), the libjpeg it was built with, simplejpeg if any."""
    import PIL
    import torchvision
    from PIL import features

    from alexdist.data.decode import _simplejpeg

    sj = _simplejpeg()
    return {"pillow": PIL.__version__, "pillow_simd": ".post" in PIL.__version__,
            "libjpeg_turbo": features.version("libjpeg_turbo") if features.check_feature("libjpeg_turbo") else None,
            "simplejpeg": sj.__version__ if sj else None, "torchvision": torchvision.__version__}


# key -> (what, size, train, eval_resize, goal vs torchvision); each pipeline on the same files and workers
CASES = {
    "rrc224": ("train, RandomResizedCrop 224 + flip", 224, True, None, 2.0),
    "rrc64": ("train, RandomResizedCrop 64 + flip", 64, True, None, 3.0),
    "rrc32": ("train, RandomResizedCrop 32 + flip", 32, True, None, 3.0),
    "eval224": ("eval, Resize 256 + CenterCrop 224", 224, False, 256, 2.0),
}


def _keep_best(runs: dict, key: str, result: tuple[float, float]) -> None:
    best = runs.setdefault(key, {"img_s": 0.0, "cpu_ms": float("inf")})
    best["img_s"], best["cpu_ms"] = max(best["img_s"], result[0]), min(best["cpu_ms"], result[1])
    print(f"{key}: {result[0]:,.0f} img/s, {result[1]:.2f} CPU ms/img", flush=True)


def measure(paths: list[Path], rounds: int, pillow_too: bool) -> dict:
    """Best of `rounds` per pipeline (highest rate, least CPU), the pipelines interleaved so that a slow spell of
    a shared machine hits every side of a comparison alike."""
    runs: dict = {}
    for _ in range(rounds):
        _keep_best(runs, "raw_decode", raw_decode_ips(paths))
        _keep_best(runs, "raw_decode_half", raw_decode_ips(paths, reduce=2))
        for key, (_what, size, train, eval_resize, _goal) in CASES.items():
            _keep_best(runs, f"{key}/alexdist", ours(paths, size, train, eval_resize))
            if pillow_too:
                _keep_best(runs, f"{key}/alexdist_pillow", ours(paths, size, train, eval_resize, pillow_only=True))
            _keep_best(runs, f"{key}/torchvision", torchvision_ips(size, train))
    out = {"runs": runs}
    raw = runs["raw_decode"]
    for key, (*_, goal) in CASES.items():
        a, t = runs[f"{key}/alexdist"], runs[f"{key}/torchvision"]
        out[key] = {"ratio": a["img_s"] / t["img_s"], "cpu_ratio": t["cpu_ms"] / a["cpu_ms"], "goal": goal,
                    "of_raw_decode": a["img_s"] / raw["img_s"], "cpu_of_raw_decode": raw["cpu_ms"] / a["cpu_ms"]}
    return out


def _cell(run: dict | None) -> str:
    return f"{run['img_s']:,.0f} ({run['cpu_ms']:.2f})" if run else "-"


def table(res: dict) -> list[str]:
    runs, st = res["runs"], res["stack"]
    sizes = [p.stat().st_size for p in make_images(DATA)]
    raw, half = runs["raw_decode"], runs["raw_decode_half"]
    decoder = f"simplejpeg {st['simplejpeg']} (JPEG), else Pillow" if st["simplejpeg"] else "Pillow"
    lines = [f"{FILES} JPEGs ({np.mean(sizes) / 1e3:.0f} KB on average, ImageNet sizes, in the page cache), batch "
             f"{BATCH}, {WORKERS} loader workers on each side; best of {res['rounds']} rounds of {PASSES} passes, the "
             f"first {WARMUP_BATCHES} batches not timed. Output: normalized float batches at the model's input.", "",
             f"Pillow {st['pillow']} ({'Pillow-SIMD' if st['pillow_simd'] else 'not Pillow-SIMD'}), libjpeg-turbo "
             f"{st['libjpeg_turbo']}, simplejpeg {st['simplejpeg'] or 'not installed'} (optional: pip install "
             f"simplejpeg), torchvision "
             f"{st['torchvision']}. alexdist decodes with {decoder}.", "",
             f"Raw Pillow decode in {WORKERS} processes (open, decode, RGB; nothing else): {raw['img_s']:,.0f} img/s, "
             f"{raw['cpu_ms']:.2f} CPU ms/img; at half size (draft): {half['img_s']:,.0f} img/s, "
             f"{half['cpu_ms']:.2f} CPU ms/img.", "",
             "img/s (CPU ms/img) per pipeline; ratios of alexdist's first column: wall-clock rate, CPU per image.", "",
             "| pipeline | alexdist | alexdist without simplejpeg | torchvision | vs torchvision (goal) "
             "| vs raw decode (goal) |", "|---|---|---|---|---|---|"]
    for key, (what, *_, goal) in CASES.items():
        r = res[key]
        cells = [_cell(runs.get(f"{key}/{side}")) for side in ("alexdist", "alexdist_pillow", "torchvision")]
        lines.append(f"| {what} | {' | '.join(cells)} | {r['ratio']:.2f}x, {r['cpu_ratio']:.2f}x (>= {goal:.0f}x) "
                     f"| {r['of_raw_decode']:.2f}, {r['cpu_of_raw_decode']:.2f} (>= 0.6) |")
    lines += ["", "Where the time goes at 224 px RandomResizedCrop (one process, one thread; CPU ms/img, cumulative):",
              ""] + [f"- {side}: " + "; ".join(f"{k} {v:.2f}" for k, v in res["stages_224"][side].items())
                     for side in ("alexdist", "torchvision")]
    load, one = res["load_average"], "; ratios from one round" if res["rounds"] == 1 else ""
    busy = f" (above {WORKERS}: other work shared the cores)" if max(load) > WORKERS else ""
    lines += ["", f"Load average of the machine's {os.cpu_count()} cores {load[0]:.1f} -> {load[1]:.1f} over the "
              f"run{busy}{one}."]
    lines += ["", "CPU ms/img: user + system time of the main process and its workers per image delivered, the cost "
              "whatever else the machine runs; img/s is the wall-clock rate.", "",
              "alexdist: what a run streams, StreamBatches / StreamEvalSet (alexdist/data/streamed.py) over the "
              "files' index: whole micro-batches per DataLoader item (entry ids and crop draws from the trainer), "
              "read and decoded by decode_train / decode_eval (reduced-size JPEG decode where the crop allows) "
              "straight into a channels-last uint8 batch in shared memory, reused by each worker in turn; in the "
              "trainer made contiguous and normalized (one intra-op thread on both sides). Its epoch is the "
              f"{PASSES} passes over the files, so its workers do not drain between passes. torchvision: "
              "ImageFolder, per-image RandomResizedCrop / Resize + CenterCrop, flip, ToTensor, Normalize, default "
              "collate."]
    return lines


def main() -> None:
    from common import write

    from alexdist.data.decode import _simplejpeg

    rounds = int(os.environ.get("LOADER_SPEED_ROUNDS", "2"))
    # The main process only normalizes (alexdist) or receives (torchvision): with more intra-op threads, OpenMP's
    # idle threads spin between batches against the workers for the same cores (0.3 CPU ms/img at 64 px here).
    torch.set_num_threads(1)
    paths = make_images(DATA)
    res = {"files": FILES, "batch": BATCH, "workers": WORKERS, "rounds": rounds, "stack": image_stack(),
           "load_average": [os.getloadavg()[0]], "stages_224": stages(paths),
           **measure(paths, rounds, pillow_too=_simplejpeg() is not None)}
    res["load_average"].append(os.getloadavg()[0])  # other work on the cores stretches img/s, less CPU ms/img
    write("loader_speed", res, table(res), "nice -n 10 .venv/bin/python benchmarks/loader_speed.py")


if __name__ == "__main__":
    main()
