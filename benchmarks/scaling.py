"""How the work scales: step time against batch size, images/s against gradient accumulation, achieved FLOP/s.

    .venv/bin/python benchmarks/scaling.py      # -> benchmarks/results/scaling.{json,md}

The three models at their recipe input sizes (alexnet 227 px, the 3x3 models 32 px), fp32, one process.
- Batch size: a bare training step (forward, backward, SGD) timed after one warm-up step, median of 3.
  FLOP/s = 3 x forward FLOPs per image (the registry's count, from torch's FlopCounterMode; backward ~2x forward)
  x images/s.
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


def accumulation(name: str, size: int, micro: int, micro_steps: int) -> list[dict]:
    rows = []
    for k in ACCUM:
        r = train_run([f"model.name={name}", f"model.input_size={size}", "model.width_mult=1.0",
                       "data.source=synthetic", f"data.synthetic_train={micro * micro_steps}", "data.synthetic_test=16",
                       f"train.batch_size={micro}", f"train.grad_accum={k}", "train.epochs=1", "train.log_every=1",
                       "checkpoint.epoch_end=false", "train.eval_batch_size=16"], timeout=1800)
        rows.append({"grad_accum": k, "micro_batch": micro, "optimizer_steps": r["steps"],
                     "images_per_s": steady_images_per_s(r), "epoch_images_per_s": train_images_per_s(r)})
    return rows


def main() -> None:
    data, lines = {}, []
    lines += ["## Step time against batch size (bare step, fp32, 1 process)", "",
              "| model | input | fwd GFLOPs/img | batch | step (s) | img/s | achieved GFLOP/s |", "|---|---|---|---|---|---|---|"]
    for name, (size, batches, micro, steps) in MODELS.items():
        data[name] = {"input_size": size, "batch_scaling": step_times(name, size, batches)}
        for r in data[name]["batch_scaling"]:
            lines.append(f"| {name} | {size} | {r['forward_gflops_per_image']:.3f} | {r['batch']} | {r['step_s']:.3f} "
                         f"| {r['images_per_s']:,.1f} | {r['gflop_per_s']:.1f} |")
    lines += ["", "## Images/s against gradient accumulation (alexdist loop, fp32, 1 process)", "",
              "| model | micro-batch | grad_accum | effective batch | img/s |", "|---|---|---|---|---|"]
    for name, (size, batches, micro, steps) in MODELS.items():
        data[name]["accumulation"] = accumulation(name, size, micro, steps)
        for r in data[name]["accumulation"]:
            lines.append(f"| {name} | {micro} | {r['grad_accum']} | {micro * r['grad_accum']} | {r['images_per_s']:,.1f} |")
    write("scaling", data, lines, "python benchmarks/scaling.py")


if __name__ == "__main__":
    main()
