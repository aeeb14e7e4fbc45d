"""`alexdist` command: one entry point for the package's tools.

    alexdist models [--input-size N]     list the models with parameters and FLOPs per image
    alexdist train RECIPE [key=value...]  train in this process (use `accelerate launch -m alexdist.train` for many)
    alexdist compare RUN_DIR... [--plots DIR]   table (and plots) comparing runs
    alexdist export CHECKPOINT OUT.safetensors  one safetensors file from DDP shards or ZeRO partitions
    alexdist evaluate WEIGHTS [recipe] [k=v]    test loss and accuracy of a checkpoint or exported file
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {name: f"alexdist.{name}" for name in ("models", "train", "compare", "export", "evaluate")}
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(commands[argv[0]])
    code = module.main(argv[1:])
    if argv[0] == "train":
        from alexdist.distributed import exit_now

        exit_now(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
