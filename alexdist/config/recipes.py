"""The recipes shipped inside the package (`alexdist train bn` works without a clone), found by name."""

from __future__ import annotations

import difflib
from pathlib import Path

from alexdist.errors import ConfigError

RECIPES_DIR = Path(__file__).parent.parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship inside the package, by name (`bn` -> .../alexdist/recipes/bn.yaml)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_summary(path: Path) -> str:
    """What a recipe reproduces: the first sentence of its leading comment."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.startswith("#  "):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    return text.split(". ")[0].rstrip(".") if text else ""


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, else a shipped recipe's name (with or without `.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = path.name.removesuffix(".yaml")
    if str(name_or_path) in (name, f"{name}.yaml", f"recipes/{name}.yaml") and name in shipped:
        return shipped[name]  # e.g. `recipes/bn.yaml` typed outside a clone
    near = difflib.get_close_matches(name, shipped, n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    raise ConfigError(
        f"recipe '{name_or_path}' not found; {hint}give a YAML file or a shipped recipe: {', '.join(shipped)} "
        f"(`alexdist recipes` lists them)"
    )
