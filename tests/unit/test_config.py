from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from alexdist.config import flatten, load_recipe
from alexdist.errors import ConfigError


def test_every_shipped_recipe_validates():

    for path in sorted(ROOT.glob("recipes/*.yaml")):
        recipe = load_recipe(path)
        assert recipe.name == path.stem


def test_dotted_overrides_apply_with_yaml_types():
    r = load_recipe(
        "recipes/bn.yaml",
        ["train.epochs=3", "optim.lr=1e-3", "augment.flip=false", "tracking.tags=[a, b]", "train.max_steps=null",
         "model.name=alexnet", "data.source=digits"],
    )
    assert r.train.epochs == 3 and r.optim.lr == 1e-3 and r.augment.flip is False
    assert r.tracking.tags == ["a", "b"] and r.train.max_steps is None
    assert r.model.name == "alexnet" and r.data.source == "digits"
    assert r.train.batch_size == 128  # untouched keys keep the recipe's value


def test_unknown_key_names_the_key_and_the_nearest_valid_one():
    with pytest.raises(ConfigError) as e:
        load_recipe("recipes/bn.yaml", ["train.batchsize=64"])
    msg = str(e.value)
    assert "train.batchsize" in msg and "train.batch_size" in msg
    assert "\n" not in msg


def test_a_key_in_the_wrong_section_points_to_the_section_that_has_it():
    """`train.lr` is spelled like `train.log_every`, but the key the user means is `optim.lr`."""
    with pytest.raises(ConfigError, match=r"^unknown key 'train\.lr'; did you mean 'optim\.lr'\?$"):
        load_recipe("quickstart", ["train.lr=0.1"])
    with pytest.raises(ConfigError, match=r"^unknown key 'epochs'; did you mean 'train\.epochs'\?$"):
        load_recipe("quickstart", ["epochs=3"])  # no section at all
    with pytest.raises(ConfigError, match=r"did you mean one of 'name', 'model\.name', 'optim\.name', "):
        load_recipe("quickstart", ["train.name=x"])  # a last part several sections have: all of them


def test_unknown_key_in_a_misspelled_section_points_to_the_right_section():
    with pytest.raises(ConfigError, match="unknown section 'trian'; did you mean 'train'"):
        load_recipe("recipes/bn.yaml", ["trian.epochs=2"])


def test_wrong_type_names_the_key_and_the_value():
    with pytest.raises(ConfigError) as e:
        load_recipe("recipes/bn.yaml", ["train.epochs=many"])
    assert "train.epochs" in str(e.value) and "'many'" in str(e.value)
    with pytest.raises(ConfigError, match="precision"):
        load_recipe("recipes/bn.yaml", ["precision=fp8"])


def test_impossible_values_are_refused():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_recipe("recipes/bn.yaml", ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="optim.lr"):
        load_recipe("recipes/bn.yaml", ["optim.lr=-0.1"])


def test_unknown_model_suggests_the_nearest_name():
    with pytest.raises(ConfigError, match="unknown model 'alexnet_nb'.*alexnet_bn"):
        load_recipe("recipes/bn.yaml", ["model.name=alexnet_nb"])


def test_malformed_yaml_and_missing_recipe_give_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe("recipes/bn.yaml", ["train.epochs"])


def test_flatten_gives_dotted_keys_for_trackers():
    flat = flatten(load_recipe("recipes/quickstart.yaml").to_dict())
    assert flat["model.name"] == "alexnet_bn" and flat["train.batch_size"] == 32 and flat["data.source"] == "digits"


def test_unquoted_precision_no_means_no_mixed_precision():
    assert load_recipe("recipes/quickstart.yaml", ["precision=no"]).precision == "no"


@pytest.mark.parametrize(("old", "new", "value"), [
    ("distributed.zero_stage", "distributed.deepspeed.zero_stage", 3),
    ("distributed.offload_optimizer", "distributed.deepspeed.offload_optimizer", True),
    ("distributed.timeout_s", "distributed.step_timeout_s", 77),
    ("speed.profile_steps", "tracking.profile_steps", [3, 5]),
    ("train.ema_eval", "train.ema_is_model", True),
    ("checkpoint.epoch_end", "checkpoint.at_epoch_end", False),
    ("tracking.target_acc", "tracking.time_to_acc", 0.9),
])
def test_a_deprecated_key_still_loads_under_its_new_name_with_a_one_line_notice(old, new, value, capsys, tmp_path):
    from alexdist.config import Recipe
    from alexdist.config.loading import DEPRECATED_KEYS

    assert DEPRECATED_KEYS[old] == new
    both = ["train.ema_decay=0.999"]  # train.ema_is_model needs it; the other keys ignore it

    def write(key: str) -> Path:  # a recipe file that sets `key`
        tree: dict = {"name": "mine", "train": {"ema_decay": 0.999}}
        *sections, last = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path

    for source in ("override", "file"):  # on the command line and in a recipe file
        if source == "override":
            recipe, same = (load_recipe("recipes/quickstart.yaml", [*both, f"{k}={value}"]) for k in (old, new))
        else:
            recipe, same = (load_recipe(write(k)) for k in (old, new))
        assert recipe == same and flatten(recipe.model_dump())[new] != flatten(Recipe().model_dump())[new]
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"alexdist: warning: '{old}' is deprecated: write '{new}' (the old name stops working in the "
                       f"next release)"]
    capsys.readouterr()
    load_recipe("recipes/quickstart.yaml", [*both, f"{new}={value}"])
    assert capsys.readouterr().err == ""  # the new name alone: no notice (control)


def test_a_deprecated_key_beside_its_new_name_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="'train.ema_eval' is the deprecated name of 'train.ema_is_model' and both "
                                          "are set; keep 'train.ema_is_model' only"):
        load_recipe("recipes/quickstart.yaml", ["train.ema_eval=true", "train.ema_is_model=false"])


def test_every_deprecated_key_points_to_a_key_of_the_schema():
    from alexdist.config import Recipe
    from alexdist.config.loading import DEPRECATED_KEYS

    keys = set(flatten(Recipe().model_dump()))
    assert not [new for new in DEPRECATED_KEYS.values() if new not in keys]
    assert not [old for old in DEPRECATED_KEYS if old in keys]  # an old name is never also a live key


def test_a_recipe_without_output_dir_trains_into_a_run_directory_of_its_own_name(tmp_path):
    """Two recipe files without output_dir must not share (and resume) one run directory."""
    a, b = tmp_path / "small.yaml", tmp_path / "large.yaml"
    a.write_text("train:\n  epochs: 2\n")
    b.write_text("optim:\n  name: adamw\n")
    assert load_recipe(a).output_dir == "runs/small" and load_recipe(b).output_dir == "runs/large"
    assert load_recipe("quickstart").output_dir == "runs/quickstart"  # a recipe's own output_dir stays
    assert load_recipe(a, ["output_dir=elsewhere"]).output_dir == "elsewhere"
