"""alexdist's training step, through its real loop, against a bare PyTorch loop: same model, batch, optimizer,
precision, on one process.

    .venv/bin/python benchmarks/step_overhead.py      # -> benchmarks/results/step_overhead.{json,md}

alexdist: `python -m alexdist.train` on synthetic images for one epoch, logging every step; the per-step rate
comes from the run's own step times in metrics.jsonl, first step excluded. That includes what a real run does
per step: building the batch (crop + flip + normalise on the device), Accelerate's accumulate/backward/step,
the divergence guard's checks, the stop-request agreement, on-device statistics, the log line.
Bare: a hand-written loop over ready-made normalised batches (no augmentation at all): forward, cross entropy,
backward, SGD step, zero_grad; under `torch.autocast` for bf16, as Accelerate does; timed the same way.
The whole epoch including the first step is reported too: alexdist's first step pays one-time costs (lazy
imports, ~0.3 s). Runs alternate (bare, alexdist, bare, alexdist, ...) and each side's best is kept, because
this machine's speed drifts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import ROOT, env, steady_images_per_s, train_images_per_s, train_run, write

# (precision, width_mult, per-process batch, steps). bf16 has no native support on this CPU (~25x slower):
# a narrower model keeps it to seconds.
# The last row adds speed.bn_fp32 (BatchNorm arithmetic in fp32 under autocast: more work than the bare loop's).
CASES = [("no", 1.0, 64, 20, []), ("bf16", 0.25, 32, 40, ["speed.bn_fp32=false"]),
         ("bf16", 0.25, 32, 40, ["speed.bn_fp32=true"])]
ROUNDS = 3


def bare(precision: str, width: float, batch: int, steps: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    from alexdist.models import build_model

    torch.manual_seed(0)
    model = build_model("alexnet_bn", 32, dropout=0.2, width_mult=width)
    # The same optimizer kernel as alexdist picks (fused on this CPU), so the two sides do the same work.
    from alexdist.training.optim import kernel_kwargs

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          **kernel_kwargs("auto", "cpu"))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(steps)]
    ys = [torch.randint(0, 10, (batch,), generator=g) for _ in range(steps)]
    model.train()
    times = [time.perf_counter()]
    for x, y in zip(xs, ys, strict=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter())
    # (steady: first step excluded, whole epoch)
    return (steps - 1) * batch / (times[-1] - times[1]), steps * batch / (times[-1] - times[0])


def alexdist(precision: str, width: float, batch: int, steps: int, extra: list[str]) -> tuple[float, float]:
    result = train_run([
        "data.source=synthetic", f"data.synthetic_train={batch * steps}", "data.synthetic_test=64",
        f"model.width_mult={width}", f"train.batch_size={batch}", "train.epochs=1", f"precision={precision}",
        "train.log_every=1", "checkpoint.at_epoch_end=false", "optim.ref_batch=null", *extra,
    ])
    assert result["steps"] == steps, result["steps"]
    return steady_images_per_s(result), train_images_per_s(result)


def main() -> None:
    rows, data = [], {}
    for precision, width, batch, steps, extra in CASES:
        b, a = [], []
        for _ in range(ROUNDS):
            out = subprocess.run([sys.executable, __file__, "--bare", precision, str(width), str(batch), str(steps)],
                                 cwd=ROOT, env=env(), capture_output=True, text=True, check=True)
            b.append(json.loads(out.stdout.strip().splitlines()[-1]))
            a.append(alexdist(precision, width, batch, steps, extra))
        name = "fp32" if precision == "no" else precision
        name += {"speed.bn_fp32=false": "", "speed.bn_fp32=true": " + speed.bn_fp32 (option)"}.get(" ".join(extra), "")
        steady_b, steady_a = max(x[0] for x in b), max(x[0] for x in a)
        whole_b, whole_a = max(x[1] for x in b), max(x[1] for x in a)
        ratio = steady_b / steady_a  # step time alexdist / step time bare
        data[name] = {"width_mult": width, "batch": batch, "steps": steps,
                      "bare_images_per_s": {"steady": [x[0] for x in b], "epoch": [x[1] for x in b]},
                      "alexdist_images_per_s": {"steady": [x[0] for x in a], "epoch": [x[1] for x in a]},
                      "step_time_ratio": ratio, "epoch_time_ratio": whole_b / whole_a}
        rows.append(f"| {name} | alexnet_bn x{width} | {batch} | {steps} | {steady_b:,.1f} | {steady_a:,.1f} | "
                    f"**{ratio:.3f}** | {'yes' if ratio <= 1.05 else 'no'} | {whole_b / whole_a:.3f} |")
    write("step_overhead", data, [
        f"One process, 32 px synthetic images; best of {ROUNDS} alternating runs per side. Step-time ratio = "
        "alexdist step time / bare step time, first step excluded (goal <= 1.05); epoch ratio: the same with the "
        "first step included. alexdist's step also builds its batch (augmentation included) and logs it; the bare "
        "loop's batches are ready-made.", "",
        "| precision | model | batch | steps | bare loop (img/s) | alexdist loop (img/s) | step-time ratio | <= 1.05 "
        "| epoch ratio (first step incl.) |", "|---|---|---|---|---|---|---|---|---|", *rows,
    ], "python benchmarks/step_overhead.py")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bare", nargs=4, metavar=("PRECISION", "WIDTH", "BATCH", "STEPS"))
    args = ap.parse_args()
    if args.bare:
        p, w, bs, n = args.bare
        print(json.dumps(bare(p, float(w), int(bs), int(n))))
    else:
        main()
