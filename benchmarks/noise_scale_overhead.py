"""What measuring the gradient noise scale (tracking.noise_scale, on by default) costs a training step, through
the real loop on this CPU.

    .venv/bin/python benchmarks/noise_scale_overhead.py      # -> benchmarks/results/noise_scale_overhead.{json,md}

Both places it is measured: DDP's communication hook on 2 processes (a norm per parameter of the local
gradients, before the all-reduce) and, on one process, the first of train.grad_accum micro-batches (the norm of
the gradient after that micro-batch). Either way the norms stay on the device and ride in the step's one
all-reduce, so the goal is a step time within 2 % of the same run without it. Runs alternate (off, on, off,
on, ...); each run's typical step is the median of its step times (a step that other jobs on the machine
delayed is an outlier, not the typical step), and each side's best run is kept, because this machine's speed
drifts.
"""

from __future__ import annotations

import itertools
import statistics

from common import train_run, write

GLOBAL_BATCH, STEPS, ROUNDS, GOAL = 64, 48, 3, 1.02
CASES = {  # name: (processes, overrides)
    "DDP, 2 processes (communication hook)": (2, []),
    "1 process, train.grad_accum=2 (first micro-batch)": (1, ["train.grad_accum=2"]),
}


def median_rate(nproc: int, common: list[str], on: bool, rounds: list[float]) -> None:
    """Images/s of the run's median step (needs train.log_every=1; the first step, with its one-time costs, left
    out)."""
    result = train_run([*common, f"tracking.noise_scale={str(on).lower()}"], nproc)
    times = [e["time"] for e in result["events"] if e["event"] == "step"]
    rounds.append(result["effective_batch"] / statistics.median(b - a for a, b in itertools.pairwise(times)))


def main() -> None:
    data, rows = {}, []
    for name, (nproc, extra) in CASES.items():
        common = ["data.source=synthetic", f"data.synthetic_train={GLOBAL_BATCH * STEPS}", "data.synthetic_test=64",
                  f"train.global_batch={GLOBAL_BATCH}", "train.epochs=1", "train.log_every=1",
                  "checkpoint.at_epoch_end=false", *extra]
        off: list[float] = []
        on: list[float] = []
        for _ in range(ROUNDS):
            median_rate(nproc, common, False, off)
            median_rate(nproc, common, True, on)
        ratio = max(off) / max(on)  # step time with / step time without
        data[name] = {"processes": nproc, "global_batch": GLOBAL_BATCH, "steps": STEPS, "off_images_per_s": off,
                      "on_images_per_s": on, "step_time_ratio": ratio}
        rows.append(f"| {name} | {GLOBAL_BATCH} | {max(off):,.0f} | {max(on):,.0f} | **{ratio:.3f}** | "
                    f"{'yes' if ratio <= GOAL else 'no'} |")
    write("noise_scale_overhead", data, [
        f"The quickstart model (alexnet_bn x0.25, 32 px synthetic images), global batch {GLOBAL_BATCH}, {STEPS} "
        f"steps, best of {ROUNDS} alternating runs per side; images/s of each run's median step (its own step "
        f"times, first step excluded). Step-time ratio = step time with tracking.noise_scale=true / without "
        f"(goal <= {GOAL}).", "",
        "| where it is measured | global batch | off (img/s) | on (img/s) | step-time ratio | <= 1.02 |",
        "|---|---|---|---|---|---|", *rows,
    ], "python benchmarks/noise_scale_overhead.py")


if __name__ == "__main__":
    main()
