"""`alexdist`: one command for the package's tools.

usage: alexdist COMMAND [ARGS...]

commands:
  train RECIPE [key=value ...]       train in this process (for several: accelerate launch -m alexdist.train)
  recipes                            list the shipped recipes (use them by name: alexdist train bn)
  models [--input-size N]            list the models with parameters and FLOPs per image
  compare RUN_DIR... [--plots DIR]   a table (and plots) comparing runs, or W&B runs with --wandb
  export CHECKPOINT OUT.safetensors  one weights file from DDP shards, ZeRO partitions or FSDP shards
  evaluate WEIGHTS [RECIPE] [k=v]    test loss, accuracy and per-class results of a checkpoint or weights file
  predict IMAGE... --weights W       the top classes of image files

options:
  -h, --help     show this message
  --version      show the version

`alexdist COMMAND --help` explains each command.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from alexdist import __version__

# Each command's `main(argv, prog=...)`, imported only when used (train pulls in torch and Accelerate).
COMMANDS = {"train": "alexdist.train:main", "recipes": "alexdist.cli:list_recipes", "models": "alexdist.models:main",
            "compare": "alexdist.compare:main", "export": "alexdist.export:main", "evaluate": "alexdist.evaluate:main",
            "predict": "alexdist.predict:main"}


def list_recipes(argv: list[str] | None = None, prog: str = "alexdist recipes") -> int:
    """`alexdist recipes`: the shipped recipes, with the model, data and what each reproduces."""
    import argparse

    from alexdist.config import load_recipe, recipe_summary, shipped_recipes

    argparse.ArgumentParser(prog=prog, description=list_recipes.__doc__.split(": ", 1)[1]).parse_args(argv)
    for name, path in shipped_recipes().items():
        r = load_recipe(path)
        print(f"{name:<11} {r.model.name:<12} {r.data.source:<15} {recipe_summary(path)}")
    print(f"\n(files in {path.parent}; run one with: alexdist train NAME, or accelerate launch -m alexdist.train NAME)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] == "--version":
        print(f"alexdist {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        print(f"alexdist: error: unknown command '{name}'; {hint}commands: {', '.join(COMMANDS)} "
              f"(alexdist --help)", file=sys.stderr)
        return 2
    module, func = COMMANDS[name].split(":")
    code = getattr(importlib.import_module(module), func)(argv[1:], prog=f"alexdist {name}")
    if name == "train":
        from alexdist.distributed import exit_now

        exit_now(code)  # see exit_now: gloo may abort at interpreter teardown
    return code


if __name__ == "__main__":
    raise SystemExit(main())
