"""Train a model of the AlexNet family from a recipe.

    accelerate launch -m alexdist.train bn [key=value ...]             # a shipped recipe, by name
    accelerate launch -m alexdist.train recipes/bn.yaml [key=value ...]  # or any recipe file
    accelerate launch --multi_gpu --num_processes 2 -m alexdist.train quickstart   # 2 CPU ranks
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m alexdist.train bn
    alexdist train quickstart train.epochs=1                            # one process, no launcher

The command: arguments, and what a failure says. The loop itself is alexdist/training/loop.py.
"""

from __future__ import annotations

import argparse
import re
import sys

from alexdist.config import load_recipe
from alexdist.config.help import sections_help
from alexdist.errors import STOPPED_EXIT_CODE, run_command
from alexdist.ranks import launch_rank


def main(argv: list[str] | None = None, prog: str = "python -m alexdist.train") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Train from a recipe. Overrides are dotted key=value pairs, e.g. train.epochs=5 "
        "model.name=alexnet.",
        epilog=f"recipe sections:\n{sections_help()}\n\nEvery key with its default, allowed values and what it "
        f"does: alexdist config RECIPE [key=value ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Optional to argparse, so that a missing recipe gets our message (argparse's says "required: recipe,
    # overrides"); the usage line still shows it as required.
    ap.usage = "%(prog)s [-h] recipe [key=value ...]"
    ap.add_argument("recipe", nargs="?",
                    help="a shipped recipe's name (`alexdist recipes` lists them) or a recipe YAML file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    args, unknown = ap.parse_known_args(argv)
    if problem := _command_line_problem(args.recipe, args.overrides, unknown, prog):
        print(f"alexdist: error: {problem}", file=sys.stderr)
        return 2

    def body() -> int:
        recipe = load_recipe(args.recipe, args.overrides)
        # torch and the loop only once the recipe is valid: a mistyped key is said in a fraction of the second
        # (in every rank of a launch) that importing them takes.
        from alexdist.tracking.summary import Ending
        from alexdist.training.loop import train

        summary = train(recipe)
        return STOPPED_EXIT_CODE if summary["status"] == Ending.STOP_REQUESTED.value else 0

    try:
        return run_command(body)
    except RuntimeError as exc:
        from alexdist.distributed.collectives import lost_peer

        if not lost_peer(exc):
            raise
        # Another process died (or hung past distributed.step_timeout_s) and this one's collective failed.
        detail = re.sub(r"^\[[^]]*\] ", "", str(exc).strip().splitlines()[0]).split(". ")[0][:120]
        print(
            f"alexdist: error: rank {launch_rank()} lost contact with the other processes ({detail}); the run "
            f"continues from its last complete checkpoint when relaunched (checkpoint.resume=auto)",
            file=sys.stderr,
        )
        return 1


def _command_line_problem(recipe: str | None, overrides: list[str], unknown: list[str], prog: str) -> str | None:
    """What is wrong with the command line, in one line with its fix; None if nothing."""
    if unknown:  # habits from jsonargparse / Lightning: --train.epochs=5, --print_config
        bad = unknown[0]
        if bad.lstrip("-").partition("=")[0].replace("-", "_") == "print_config":
            shown = " ".join([recipe or "RECIPE", *overrides])
            return f"unknown option {bad}: to print the resolved recipe with every key, run: alexdist config {shown}"
        fix = bad.lstrip("-") if "=" in bad else f"{bad.lstrip('-')}=VALUE"
        return f"unknown option {bad}: overrides are key=value without dashes; write {fix}"
    if recipe is None:
        return (f"{prog} needs a recipe: a shipped recipe's name (`alexdist recipes` lists them) or a recipe YAML "
                f"file, e.g. {prog} quickstart")
    return None
