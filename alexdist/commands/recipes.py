"""`alexdist recipes`: the shipped recipes, with the model, data and what each reproduces."""

from __future__ import annotations

import argparse

from alexdist.config import load_recipe, recipe_summary, shipped_recipes


def main(argv: list[str] | None = None, prog: str = "alexdist recipes") -> int:
    argparse.ArgumentParser(prog=prog, description=__doc__.split(": ", 1)[1]).parse_args(argv)
    rows = [(name, load_recipe(path), path) for name, path in shipped_recipes().items()]
    cells = [(name, r.model.name, r.data.source) for name, r, _ in rows]
    widths = [max(len(x) for x in col) for col in zip(*cells, strict=True)]
    for row, (_, _, path) in zip(cells, rows, strict=True):
        print(" ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)), recipe_summary(path))
    print(f"\n(files in {path.parent}; run one with: alexdist train NAME, or accelerate launch -m alexdist.train NAME)")
    return 0
