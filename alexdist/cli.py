"""`alexdist`: one command for the package's tools.

usage: alexdist COMMAND [ARGS...]

commands:
  train RECIPE [key=value ...]       train in this process
  launch [ACCELERATE-LAUNCH OPTIONS] RECIPE [key=value ...]
                                     train in several processes (accelerate launch -m alexdist.train, with
                                     alexdist's one-line errors and exit codes)
  recipes                            list the shipped recipes (use them by name: alexdist train bn)
  config RECIPE [key=value ...]      every key of a recipe, resolved, with defaults and what each does
  models [--input-size N]            list the models with parameters and FLOPs per image
  compare RUN_DIR... [--plots DIR]   a table (and plots) comparing runs, or W&B runs with --wandb
  export CHECKPOINT OUT.safetensors  one weights file from DDP shards, ZeRO partitions or FSDP shards
  evaluate WEIGHTS [RECIPE] [k=v]    test loss, accuracy and per-class results of a checkpoint or weights file
  predict IMAGE... --weights W       the top classes of image files
  index SOURCE [--skip-corrupt]      check a folder of images (ImageNet layout, Hub parquet, tar shards) and
                                     index it for streaming, once, before training

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
COMMANDS = {name: f"alexdist.commands.{name}:main"
            for name in ("train", "launch", "recipes", "config", "models", "compare", "export", "evaluate", "predict",
                         "index")}


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
        from alexdist.distributed.processes import exit_now

        exit_now(code)  # see exit_now: gloo may abort at interpreter teardown
    return code


if __name__ == "__main__":
    raise SystemExit(main())
