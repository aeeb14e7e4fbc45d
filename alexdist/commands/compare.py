"""`alexdist compare`: a table (and plots) comparing runs, from run directories or from W&B.

    alexdist compare runs/*                               # run directories (offline)
    alexdist compare --wandb ENTITY/PROJECT --group bn    # runs fetched from W&B (online)
    alexdist compare --wandb ENTITY/PROJECT --sweep ID    # a W&B sweep's trials (recipes/sweeps/)
    alexdist compare runs/bn/sweep-ID/*                   # the same trials from their run directories
    alexdist compare runs/* --sort images_per_s --csv table.csv --plots plots/
"""

from __future__ import annotations

import argparse
import csv
import glob
import sys
from pathlib import Path

from alexdist.tracking.compare import COLUMNS, from_run_dir, from_wandb_api, markdown, plot, table


def main(argv: list[str] | None = None, prog: str = "alexdist compare") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="run directories or globs (runs/*)")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT", help="fetch runs from W&B instead (online)")
    ap.add_argument("--group", help="with --wandb: only this group")
    ap.add_argument("--tag", help="with --wandb: only runs with this tag")
    ap.add_argument("--sweep", metavar="SWEEP_ID", help="with --wandb: the runs of this W&B sweep")
    ap.add_argument("--sort", default="best_acc", choices=[k for k, _ in COLUMNS],
                    help="sort column (default: the best accuracy, chosen on validation where a run has a split)")
    ap.add_argument("--ascending", action="store_true")
    ap.add_argument("--target-acc", type=float, help="accuracy for the time-to-target column (default: each run's)")
    ap.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    ap.add_argument("--plots", metavar="DIR", help="write PNG plots here")
    args = ap.parse_args(argv)
    if args.wandb:
        records = from_wandb_api(args.wandb, args.group, args.tag, args.sweep)
    else:
        paths = [Path(p) for pattern in args.runs for p in sorted(glob.glob(pattern))]
        paths = [p for p in paths if (p / "config.yaml").is_file()]
        if not paths:
            print("alexdist: error: no run directories (with config.yaml) match; pass e.g. runs/*", file=sys.stderr)
            return 2
        records = [from_run_dir(p) for p in paths]
    rows, records, extra = table(records, args.sort, args.ascending, args.target_acc)
    print(markdown(rows, extra))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=[k for k, _ in COLUMNS] + extra)
            w.writeheader()
            w.writerows(rows)
    if args.plots:
        for p in plot(records, rows, args.plots):
            print(f"wrote {p}", file=sys.stderr)
    return 0
