"""Optional dependencies (pyproject.toml's extras): a feature whose extra is missing says so in one line with the
command that installs it, before any work; every hint names an extra that exists, every package alexdist imports
is declared, an extra's packages are imported only by the feature that needs them, and `make setup` installs
every extra for the tests. tests/wheel_check.sh (`make wheel-check`) checks the same on a real install without
the extras."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys

import pytest
import torch
from helpers import ROOT

from alexdist.checkpoint.weights import save_weights
from alexdist.commands.export import main as export
from alexdist.errors import SetupError, require_extra

tomllib = pytest.importorskip("tomllib")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
SOURCES = sorted((ROOT / "alexdist").rglob("*.py"))


def _dist(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_export_onnx_without_its_extra_says_how_to_install_it_in_one_line_and_writes_nothing(
        tmp_path, monkeypatch, capsys):
    weights = save_weights(tmp_path / "w.safetensors", {"w": torch.ones(2)}, {"model": "alexnet", "step": "1"})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when it is not installed
    code = export([str(weights), str(tmp_path / "out.safetensors"), "--onnx", str(tmp_path / "out.onnx")])
    assert code == SetupError.exit_code == 4
    assert capsys.readouterr().err.splitlines() == [
        "alexdist: error: alexdist export --onnx needs the 'onnx' extra (onnxruntime is not installed): "
        "pip install 'alexdist[onnx]'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # OUT is not written without the ONNX


def test_a_package_of_an_extra_that_does_not_import_is_shown_with_its_cause(tmp_path, monkeypatch):
    (tmp_path / "broken_extra_pkg.py").write_text("raise ImportError('libonnxruntime.so.1: cannot open shared "
                                                  "object file. More text')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SetupError) as caught:
        require_extra("onnx", "a feature", "json", "broken_extra_pkg")
    assert str(caught.value) == ("a feature needs the 'onnx' extra (broken_extra_pkg does not import (ImportError: "
                                 "libonnxruntime.so.1: cannot open shared object file)): pip install 'alexdist[onnx]'")
    require_extra("onnx", "a feature", "json")  # an importable package: nothing said


HINT = re.compile(r"""alexdist\[([a-z_,-]+)\]|require_extra\(\s*["']([a-z_-]+)["']""")


def test_every_install_hint_names_an_extra_that_pyproject_declares():
    named = {name for p in SOURCES for m in HINT.findall(p.read_text()) for name in ",".join(m).split(",") if name}
    assert {"onnx", "deepspeed"} <= named  # the scan sees the hints (control)
    assert not named - set(EXTRAS), f"hints name extras pyproject.toml lacks: {sorted(named - set(EXTRAS))}"


def _imports(tree: ast.AST) -> set[str]:
    return {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in _installed().get(module, [])}


def test_every_package_alexdist_imports_is_a_dependency_or_in_an_extra():
    declared = {_dist(r) for r in PROJECT["dependencies"]} | {_dist(r) for reqs in EXTRAS.values() for r in reqs}
    third_party = {m for p in SOURCES for m in _imports(ast.parse(p.read_text()))} - set(sys.stdlib_module_names)
    undeclared = {m: _distributions(m) for m in sorted(third_party - {"alexdist"}) if not _distributions(m) & declared}
    assert {"sklearn", "yaml", "PIL"} <= third_party  # import names that differ from their distribution's (control)
    assert not undeclared, f"imported but not in pyproject.toml's dependencies or extras: {undeclared}"


def test_the_packages_of_extras_are_imported_only_inside_the_functions_that_need_them():
    """Every alexdist module imports without any extra: an extra's package imported at a module's top level (or
    under a top-level if/try) would break every command of a wheel installed without it."""
    mandatory = {_dist(r) for r in PROJECT["dependencies"]}
    optional = {_dist(r) for name, reqs in EXTRAS.items() if name != "test" for r in reqs} - mandatory - {"alexdist"}
    top_level = []
    for p in SOURCES:
        tree = ast.parse(p.read_text())
        outer = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        top_level += [f"{p.relative_to(ROOT)}: {m}" for n in outer for m in _imports(n) if _distributions(m) & optional]
    assert {"deepspeed", "onnx", "onnxruntime"} <= optional  # (control)
    assert not top_level, top_level


def _expanded(extras: set[str]) -> set[str]:
    """The extras `pip install '.[a,b]'` installs, self-references (`alexdist[onnx]` in `test`) included."""
    found = set(extras)
    for name in extras:
        for r in EXTRAS[name]:
            if _dist(r) == "alexdist":
                found |= _expanded(set(re.search(r"\[([^]]*)\]", r).group(1).split(",")))
    return found


def test_make_setup_installs_every_extra_so_the_suite_covers_every_feature():
    installed = re.search(r"pip install -q -e '\.\[([^]]*)\]'", (ROOT / "Makefile").read_text()).group(1)
    assert "onnx" in _expanded({"test"})  # self-references are followed (control)
    assert _expanded(set(installed.split(","))) == set(EXTRAS)
