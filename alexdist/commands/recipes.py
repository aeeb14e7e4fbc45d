"""`alexdist recipes`: the shipped recipes, with the model, data and what each reproduces."""

from __future__ import annotations

import argparse

from alexdist.config import load_recipe, recipe_summary, shipped_recipes


def main(argv: list[str] | None = None, prog: str = "alexdist recipes") -> int:
    argparse.ArgumentParser(prog=prog, description=__doc__.split(": ", 1)[1]).parse_args(argv)
    for name, path in shipped_recipes().items():
        r = load_recipe(path)
        print(f"{name:<11} {r.model.name:<12} {r.data.source:<15} {recipe_summary(path)}")
    print(f"\n(files in {path.parent}; run one with: alexdist train NAME, or accelerate launch -m alexdist.train NAME)")
    return 0
