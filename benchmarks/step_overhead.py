"""alexdist's training step, through its real loop, against a bare PyTorch loop: same model, batch, optimizer,
precision, on one process.

    .venv/bin/python benchmarks/step_overhead.py      # -> benchmarks/results/step_overhead.{json,md}

alexdist: `python -m alexdist.train` on synthetic images for one epoch; images/s is the run's own figure for its
training epoch (from metrics.jsonl: every step, evaluation excluded). That includes what a real run does per
step: building the batch (crop + flip + normalise on the device), Accelerate's accumulate/backward/step, the
divergence guard's checks, the stop-request agreement, on-device statistics.
Bare: a hand-written loop over ready-made normalised batches (no augmentation at all): forward, cross entropy,
backward, SGD step, zero_grad; under `torch.autocast` for bf16, as Accelerate does. The same number of steps,
timed the same way (first step included). Runs alternate (bare, alexdist, bare, alexdist, ...) and each side's
best is kept, because this machine's speed drifts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import ROOT, env, train_images_per_s, train_run, write

# (precision, width_mult, per-process batch, steps). bf16 has no native support on this CPU (~25x slower):
# a narrower model keeps it to seconds.
CASES = [("no", 1.0, 64, 16), ("bf16", 0.25, 32, 16)]
ROUNDS = 3


def bare(precision: str, width: float, batch: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from alexdist.models import build_model

    torch.manual_seed(0)
    model = build_model("alexnet_bn", 32, dropout=0.2, width_mult=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(steps)]
    ys = [torch.randint(0, 10, (batch,), generator=g) for _ in range(steps)]
    model.train()
    t0 = time.perf_counter()
    for x, y in zip(xs, ys):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    return steps * batch / (time.perf_counter() - t0)


def alexdist(precision: str, width: float, batch: int, steps: int) -> float:
    result = train_run([
        "data.source=synthetic", f"data.synthetic_train={batch * steps}", "data.synthetic_test=64",
        f"model.width_mult={width}", f"train.batch_size={batch}", "train.epochs=1", f"precision={precision}",
        "train.log_every=0", "checkpoint.epoch_end=false", "optim.ref_batch=null",
    ])
    assert result["steps"] == steps, result["steps"]
    return train_images_per_s(result)


def main() -> None:
    rows, data = [], {}
    for precision, width, batch, steps in CASES:
        b, a = [], []
        for _ in range(ROUNDS):
            out = subprocess.run([sys.executable, __file__, "--bare", precision, str(width), str(batch), str(steps)],
                                 cwd=ROOT, env=env(), capture_output=True, text=True, check=True)
            b.append(float(out.stdout.strip().splitlines()[-1]))
            a.append(alexdist(precision, width, batch, steps))
        name = "fp32" if precision == "no" else precision
        ratio = max(b) / max(a)  # step time alexdist / step time bare
        data[name] = {"width_mult": width, "batch": batch, "steps": steps, "bare_images_per_s": b,
                      "alexdist_images_per_s": a, "step_time_ratio": ratio}
        rows.append(f"| {name} | alexnet_bn x{width} | {batch} | {steps} | {max(b):,.1f} | {max(a):,.1f} | "
                    f"{ratio:.3f} | {'yes' if ratio <= 1.05 else 'no'} |")
    write("step_overhead", data, [
        f"One process, 32 px synthetic images; best of {ROUNDS} alternating runs per side. Ratio = alexdist step "
        "time / bare step time (goal <= 1.05). alexdist's step also builds its batch (augmentation included); "
        "the bare loop's batches are ready-made.", "",
        "| precision | model | batch | steps | bare loop (img/s) | alexdist loop (img/s) | step-time ratio | <= 1.05 |",
        "|---|---|---|---|---|---|---|---|", *rows,
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
