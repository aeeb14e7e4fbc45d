import pytest

from alexdist.config import flatten, load_recipe
from alexdist.errors import ConfigError


def test_every_shipped_recipe_validates():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("recipes/*.yaml")):
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
