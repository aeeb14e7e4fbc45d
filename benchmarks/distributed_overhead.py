"""2 processes against 1 on the same global batch, through the real launcher, on this CPU.

    .venv/bin/python benchmarks/distributed_overhead.py      # -> benchmarks/results/distributed_overhead.{json,md}

Reported, not tuned: on 2 cores, two processes share the cores one process already used (each gets one thread),
so the ideal is no gain, and anything below 1.0 is the price of DDP's gradient all-reduce over gloo, the
per-step stop/NaN agreement and two interpreters. On GPUs each process has its own device and this ratio is
the scaling efficiency.
"""

from __future__ import annotations

from common import steady_images_per_s, train_run, write

GLOBAL_BATCH, STEPS, ROUNDS = 64, 16, 2
CASES = {"alexnet_bn x0.5": ["model.width_mult=0.5"], "alexnet_bn x0.25 (quickstart)": []}


def main() -> None:
    data, rows = {}, []
    for name, extra in CASES.items():
        common = ["data.source=synthetic", f"data.synthetic_train={GLOBAL_BATCH * STEPS}", "data.synthetic_test=64",
                  f"train.global_batch={GLOBAL_BATCH}", "train.epochs=1", "train.log_every=1",
                  "checkpoint.at_epoch_end=false", *extra]
        one = max(steady_images_per_s(train_run(common, nproc=1)) for _ in range(ROUNDS))
        two = max(steady_images_per_s(train_run(common, nproc=2)) for _ in range(ROUNDS))
        data[name] = {"global_batch": GLOBAL_BATCH, "steps": STEPS, "one_process_images_per_s": one,
                      "two_processes_images_per_s": two, "ratio": two / one}
        rows.append(f"| {name} | {GLOBAL_BATCH} | {one:,.0f} | {two:,.0f} | {two / one:.2f} |")
    write("distributed_overhead", data, [
        f"DDP over gloo, global batch {GLOBAL_BATCH} (1 x {GLOBAL_BATCH} or 2 x {GLOBAL_BATCH // 2}), {STEPS} steps, "
        f"best of {ROUNDS}; images/s from the runs' own step times, first step excluded.", "",
        "| model | global batch | 1 process (img/s) | 2 processes (img/s) | 2 / 1 |", "|---|---|---|---|---|", *rows,
    ], "python benchmarks/distributed_overhead.py")


if __name__ == "__main__":
    main()
