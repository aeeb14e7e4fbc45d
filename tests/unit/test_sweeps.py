"""The shipped W&B sweep: W&B's own agent code expands its command (no server: the agent's run command is fed
the way the server would feed it), and the expanded command trains for a few steps offline as a sweep trial."""


import yaml
from helpers import ROOT

SWEEP = ROOT / "recipes" / "sweeps" / "bn.yaml"


def test_the_sweep_searches_around_the_recipe_it_sweeps():
    """Each range brackets the recipe's own value (an lr range left at SGD's values while the recipe moved to LARS
    at 1.0 searched nowhere near it), and the metric is one the recipe logs: val/acc needs its validation split."""
    from alexdist.config import flatten, load_recipe

    sweep = yaml.safe_load(SWEEP.read_text())
    recipe = load_recipe(sweep["command"][4])
    values = flatten(recipe.to_dict())
    for key, spec in sweep["parameters"].items():
        if "values" in spec:
            assert values[key] in spec["values"], (key, values[key], spec["values"])
        else:
            assert spec["min"] < values[key] < spec["max"], (key, values[key], spec)
    assert recipe.data.val_split is not None  # val/acc is logged only with a validation split


