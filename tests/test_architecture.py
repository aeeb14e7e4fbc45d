"""The layout holds what the developer notes promise: every module imports, no import cycles, strategy names
compared only inside alexdist/distributed/, no function over 60 lines, no module over 400."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "alexdist"
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """alexdist modules `path` imports at module level (imports inside functions are deferred on purpose)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alexdist"):
            for alias in node.names:  # `from alexdist.x import y`: y may itself be a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("alexdist")}
    return found


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "__main__.py"], ids=module_name)
def test_every_module_imports(path):
    importlib.import_module(module_name(path))


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*trail, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_there_are_no_import_cycles():
    graph = {module_name(p): top_level_imports(p) for p in MODULES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check sees one (control)


STRATEGY_NAME = re.compile(r"""(==|!=)\s*["'](ddp|deepspeed|fsdp)["']|["'](ddp|deepspeed|fsdp)["']\s*(==|!=)""")


def test_no_strategy_name_is_compared_outside_distributed():
    found = [f"{p.relative_to(PACKAGE)}:{n}" for p in MODULES if "distributed" not in p.parts
             for n, line in enumerate(p.read_text().splitlines(), 1) if STRATEGY_NAME.search(line)]
    assert not found, found
    assert STRATEGY_NAME.search('if strategy == "fsdp":')  # the pattern finds one (control)


def test_no_function_is_longer_than_60_lines_and_no_module_longer_than_400():
    long_functions = [f"{p.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1})"
                      for p in MODULES for node in ast.walk(ast.parse(p.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 60]
    assert not long_functions, long_functions
    long_modules = [f"{p.relative_to(PACKAGE)} ({n})" for p in MODULES
                    if (n := len(p.read_text().splitlines())) > 400]
    assert not long_modules, long_modules


def test_the_readme_fits_a_few_screens_and_every_relative_link_in_the_docs_resolves():
    root = PACKAGE.parent
    readme = root / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    pages = [readme, root / "DEVELOPERS.md", *sorted((root / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(root)} -> {target}")
    assert not broken, broken
    assert len(pages) >= 10  # README, DEVELOPERS.md and the topic pages
