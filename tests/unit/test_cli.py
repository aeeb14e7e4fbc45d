"""The `alexdist` command as a user types it: help, version, typos, shipped recipes by name, progress in logs,
and a wheel installed without the repository."""


import pytest

from alexdist import __version__, cli


def test_help_goes_to_stdout_and_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: alexdist COMMAND" in out
    for name in cli.COMMANDS:
        assert f"\n  {name} " in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"alexdist {__version__}"


def test_an_unknown_command_says_so_with_the_nearest_one(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alexdist: error: unknown command 'trian'; did you mean 'train'?") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["train", "export", "evaluate", "compare", "models", "recipes"])
def test_each_commands_help_names_it_as_typed(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: alexdist {command}")


def test_recipes_lists_the_shipped_recipes_with_what_each_reproduces(capsys):
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith("(")}
    assert {"alexnet", "bn", "quickstart", "vgg"} <= set(rows)
    assert "alexnet_bn" in rows["bn"] and "uoft-cs/cifar10" in rows["bn"] and "student's report" in rows["bn"]
    assert "digits" in rows["quickstart"]


def test_alexdist_config_prints_every_schema_key_with_its_default_and_description(tmp_path, capsys):
    """`alexdist config RECIPE` is generated from the schema: every key of it appears, resolved, with a comment;
    and what it prints is a recipe that loads back to the same values."""
    import yaml

    from alexdist.commands.config import main as config_main
    from alexdist.config import flatten, load_recipe

    assert config_main(["bn", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    recipe = load_recipe("bn", ["train.epochs=3"])
    assert set(flatten(printed)) == set(flatten(recipe.to_dict()))  # every key, nothing else
    keyed = [line for line in out.splitlines() if not line.startswith("#") and ":" in line.split("#")[0]]
    leaves = [line for line in keyed if line.split("#")[0].strip().split(":", 1)[1].strip()]
    assert all("  # default " in line for line in leaves), [x for x in leaves if "  # default " not in x][:3]
    assert "one of cosine, onecycle, constant" in out and ">= 1" in out  # choices and bounds from the schema
    (tmp_path / "mine.yaml").write_text(out)
    assert load_recipe(tmp_path / "mine.yaml").to_dict() == recipe.to_dict()


def test_train_help_lists_the_sections_and_points_to_alexdist_config(capsys):
    from alexdist.commands.train import main as train_main
    from alexdist.config import Recipe

    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in Recipe.model_fields if name not in ("name", "precision", "output_dir"))
    assert "alexdist config RECIPE" in out


def test_train_without_a_recipe_says_one_is_needed_and_how_to_list_them(capsys):
    """argparse alone says "the following arguments are required: recipe, overrides": overrides are not."""
    from alexdist.commands.train import main as train_main

    assert train_main([], prog="alexdist train") == 2
    err = capsys.readouterr().err
    assert err == ("alexdist: error: alexdist train needs a recipe: a shipped recipe's name (`alexdist recipes` lists "
                   "them) or a recipe YAML file, e.g. alexdist train quickstart\n")


def test_print_config_as_jsonargparse_has_it_points_to_alexdist_config(capsys):
    from alexdist.commands.train import main as train_main

    assert train_main(["quickstart", "train.epochs=2", "--print_config"], prog="alexdist train") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "print_config=" not in err
    assert err.rstrip().endswith("run: alexdist config quickstart train.epochs=2")


def _descriptions(model, prefix: str = "") -> dict[str, str]:
    """Every described field of the schema, sections included, by dotted key."""
    from pydantic import BaseModel

    found = {}
    for name, field in model.model_fields.items():
        if field.description:
            found[prefix + name] = field.description
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found |= _descriptions(field.annotation, f"{prefix}{name}.")
    return found


@pytest.mark.parametrize("columns", [80, 120])
def test_alexdist_config_prints_every_description_whole_within_the_terminal_width(columns, monkeypatch, capsys):
    from alexdist.commands.config import main as config_main
    from alexdist.config import Recipe

    monkeypatch.setenv("COLUMNS", str(columns))
    assert config_main(["bn", "train.epochs=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= columns, max(lines, key=len)
    comments = " ".join(" ".join(line.split("# ", 1)[1] for line in lines if "# " in line).split())
    described = _descriptions(Recipe)
    assert len(described) > 50
    cut = [key for key, text in described.items() if " ".join(text.split()) not in comments]
    assert not cut, cut


def test_alexdist_config_wraps_at_100_columns_when_not_printing_to_a_terminal(monkeypatch):
    import os

    from alexdist.config.help import terminal_width

    def not_a_terminal(fd: int = 1):
        raise OSError("not a terminal")

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(os, "get_terminal_size", not_a_terminal)
    assert terminal_width() == 100
