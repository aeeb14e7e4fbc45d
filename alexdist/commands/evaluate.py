"""`alexdist evaluate`: test loss, accuracy, per-class accuracy and confusion matrix of a checkpoint, a run or
an exported weights file, on one process.

    alexdist evaluate runs/bn/checkpoints/step-0039000
    alexdist evaluate runs/bn                                       # a run directory: its final weights
    alexdist evaluate bn.safetensors [RECIPE] [key=value ...] [--tta flip]
"""

from __future__ import annotations

import argparse
import json

from alexdist.artifacts.weights_evaluation import evaluate_weights, log_eval_run, report
from alexdist.errors import run_command


def main(argv: list[str] | None = None, prog: str = "alexdist evaluate") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", help="a checkpoints/step-* directory, a run's output_dir or a .safetensors file")
    ap.add_argument("rest", nargs="*", help="[RECIPE] [key=value ...]")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--tta", choices=["none", "flip", "flip_translate"], default="none",
                    help="also report test-time augmentation's loss and accuracy (airbench's)")
    ap.add_argument("--wandb-project", metavar="PROJECT",
                    help="also record the result as a W&B run (job_type=eval; WANDB_MODE applies, offline "
                         "without a key)")
    ap.add_argument("--wandb-group", metavar="GROUP", help="W&B group, e.g. the training run's")
    args = ap.parse_args(argv)
    recipe = args.rest[0] if args.rest and "=" not in args.rest[0] else None
    overrides = args.rest[1:] if recipe else args.rest

    def body() -> int:
        r = evaluate_weights(args.weights, recipe, overrides, args.tta)
        if args.wandb_project:
            log_eval_run(r, args.weights, args.wandb_project, args.wandb_group)
        if args.json:
            print(json.dumps(r))
        else:
            print(report(r))
        return 0

    return run_command(body)
