"""How the work scales: step time against batch size, images/s against gradient accumulation, achieved FLOP/s
against what this machine can do at all.

    .venv/bin/python benchmarks/scaling.py      # -> benchmarks/results/scaling.{json,md}

The three models at their recipe input sizes (alexnet 227 px, the 3x3 models 32 px), fp32, one process.
- Batch size: a bare training step (forward, backward, SGD) timed after one warm-up step, median of 3.
  FLOP/s = 3 x forward FLOPs per image (the registry's count, from torch's FlopCounterMode; backward ~2x forward)
  x images/s.
- Ceilings, measured in the same run: the machine's fp32 matmul (2048^3, best of 5) and 3x3 convolution
  (batch 64, 128 -> 128 channels, 32x32, forward, best of 5) throughput. Each model's achieved FLOP/s is
  reported as a fraction of both: that fraction, not an absolute GFLOP/s, is comparable between machines.
- Accumulation: the real loop (`python -m alexdist.train`, synthetic data) with a fixed micro-batch and
  train.grad_accum = 1, 2, 4, the same images in each run; images/s from the run's own step times, first
  optimizer step excluded (one-time costs). Accumulation should cost nothing per
  image: the same micro-steps, fewer optimizer steps and (with several processes) fewer all-reduces.
"""

from __future__ import annotations

import statistics
import time

from common import steady_images_per_s, train_images_per_s, train_run, write

MODELS = {  # name: (input size, batch sizes, accumulation micro-batch, micro-batches per accumulation run)
    "alexnet": (227, [4, 8, 16], 8, 16),
    "alexnet_3x3": (32, [16, 32, 64, 128], 32, 24),
    "alexnet_bn": (32, [16, 32, 64, 128], 32, 24),
}
ACCUM = [1, 2, 4]


def step_times(name: str, size: int, batches: list[int]) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from alexdist.models import build_model, flops_per_image

    torch.manual_seed(0)
    model = build_model(name, size)
    fwd = flops_per_image(model, size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rows = []
    for b in batches:
        x, y = torch.randn(b, 3, size, size), torch.randint(0, 10, (b,))
        times = []
        for i in range(4):
            t0 = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # the first step warms up the allocator and kernels
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rows.append({"batch": b, "step_s": t, "images_per_s": b / t, "gflop_per_s": 3 * fwd * b / t / 1e9,
                     "forward_gflops_per_image": fwd / 1e9})
    return rows


def ceilings(repeats: int = 5) -> dict[str, float]:
    """fp32 FLOP/s of a large matmul and of a 3x3 convolution on this machine (best of `repeats`)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    x, w = torch.randn(64, 128, 32, 32), torch.randn(128, 128, 3, 3)
    work = {"matmul": (lambda: a @ b, 2 * n**3),
            "conv3x3": (lambda: F.conv2d(x, w, padding=1), 2 * 64 * 128 * 32 * 32 * 128 * 9)}
    out = {}
    for name, (fn, flops) in work.items():
        fn()  # warm-up
        best = min(_timed(fn) for _ in range(repeats))
        out[f"{name}_gflop_per_s"] = flops / best / 1e9
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def accumulation(name: str, size: int, micro: int, micro_steps: int) -> list[dict]:
    rows = []
    for k in ACCUM:
        r = train_run([f"model.name={name}", f"model.input_size={size}", "model.width_mult=1.0",
                       "data.source=synthetic", f"data.synthetic_train={micro * micro_steps}", "data.synthetic_test=16",
                       f"train.batch_size={micro}", f"train.grad_accum={k}", "train.epochs=1", "train.log_every=1",
                       "checkpoint.at_epoch_end=false", "train.eval_batch_size=16"], timeout=1800)
        rows.append({"grad_accum": k, "micro_batch": micro, "optimizer_steps": r["steps"],
                     "images_per_s": steady_images_per_s(r), "epoch_images_per_s": train_images_per_s(r)})
    return rows


def main() -> None:
    ceiling = ceilings()
    data, lines = {"ceilings": ceiling}, []
    mm, conv = ceiling["matmul_gflop_per_s"], ceiling["conv3x3_gflop_per_s"]
    lines += ["## Ceilings (fp32, this machine, measured in this run)", "",
              f"matmul 2048^3: {mm:.1f} GFLOP/s; 3x3 conv (64x128x32x32, 128 filters): {conv:.1f} GFLOP/s", ""]
    lines += ["## Step time against batch size (bare step, fp32, 1 process)", "",
              "| model | input | fwd GFLOPs/img | batch | step (s) | img/s | achieved GFLOP/s | of matmul | of conv |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, (size, batches, _, _) in MODELS.items():
        data[name] = {"input_size": size, "batch_scaling": step_times(name, size, batches)}
        for r in data[name]["batch_scaling"]:
            r["of_matmul"], r["of_conv"] = r["gflop_per_s"] / mm, r["gflop_per_s"] / conv
            lines.append(f"| {name} | {size} | {r['forward_gflops_per_image']:.3f} | {r['batch']} | {r['step_s']:.3f} "
                         f"| {r['images_per_s']:,.1f} | {r['gflop_per_s']:.1f} | {r['of_matmul']:.2f} "
                         f"| {r['of_conv']:.2f} |")
    lines += ["", "## Images/s against gradient accumulation (alexdist loop, fp32, 1 process)", "",
              "| model | micro-batch | grad_accum | effective batch | img/s |", "|---|---|---|---|---|"]
    for name, (size, _, micro, steps) in MODELS.items():
        data[name]["accumulation"] = accumulation(name, size, micro, steps)
        for r in data[name]["accumulation"]:
            lines.append(f"| {name} | {micro} | {r['grad_accum']} | {micro * r['grad_accum']} "
                         f"| {r['images_per_s']:,.1f} |")
    write("scaling", data, lines, "python benchmarks/scaling.py")


if __name__ == "__main__":
    main()
