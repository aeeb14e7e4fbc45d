"""`alexdist config RECIPE [key=value ...]`: the fully resolved recipe as YAML, every key with its value, its
default, the values it takes and what it does, generated from the schema itself. Save it as a file to start a
recipe of your own."""

from __future__ import annotations

import argparse

from alexdist.config import find_recipe, load_recipe
from alexdist.config.help import recipe_yaml
from alexdist.errors import run_command


def main(argv: list[str] | None = None, prog: str = "alexdist config") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split(": ", 1)[1])
    ap.add_argument("recipe", help="a shipped recipe's name (`alexdist recipes` lists them) or a recipe YAML file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, as `alexdist train` takes them")
    args = ap.parse_args(argv)

    def body() -> int:
        recipe = load_recipe(args.recipe, args.overrides)
        title = f"{recipe.name} ({find_recipe(args.recipe)})" + (f" with {' '.join(args.overrides)}"
                                                                  if args.overrides else "")
        print(recipe_yaml(recipe, f"{title}; each comment: default; allowed values. What the key does."), end="")
        return 0

    return run_command(body)
