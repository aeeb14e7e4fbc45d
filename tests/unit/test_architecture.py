"""The layout holds what the developer notes promise: every module imports, no import cycle (imports inside
functions count), each floor imports only the floors below it, strategy names compared only inside
alexdist/distributed/, no function over 60 lines and no module over 400 (benchmarks/ included)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "alexdist"
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def alexdist_imports(path: Path) -> set[str]:
    """alexdist modules `path` imports anywhere, inside functions too (a deferred import is still a dependency);
    only `if TYPE_CHECKING:` blocks, which never run, are left out."""
    found, tree = set(), ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if _type_checking_only(node) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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


def test_there_are_no_import_cycles_not_even_through_imports_inside_functions(tmp_path):
    graph = {module_name(p): alexdist_imports(p) for p in MODULES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check sees one (control)
    deferred = "def f():\n    from alexdist.training import loop\n"
    hidden = tmp_path / "probe.py"
    hidden.write_text(deferred)
    assert "alexdist.training.loop" in alexdist_imports(hidden)  # an import inside a function is counted (control)


# DEVELOPERS.md's floors, lowest first: each module may import its own floor and the ones below, never above.
FLOORS = [
    {"alexdist", "alexdist.ranks", "alexdist.errors", "alexdist.fileio", "alexdist.pickle_checks", "alexdist.faults",
     "alexdist.models"},
    {"config"}, {"data"}, {"distributed"}, {"checkpoint"}, {"tracking"}, {"training"}, {"artifacts"}, {"commands"},
    {"alexdist.cli", "alexdist.train", "alexdist.__main__"},
]


def floor_of(module: str) -> int:
    parts = module.split(".")
    return next(i for i, f in enumerate(FLOORS) if module in f or (len(parts) > 1 and parts[1] in f))


def test_each_floor_imports_only_the_floors_below_it():
    upward = [f"{module_name(p)} -> {dep}" for p in MODULES for dep in sorted(alexdist_imports(p))
              if floor_of(dep) > floor_of(module_name(p))]
    assert not upward, upward
    assert floor_of("alexdist.training.loop") > floor_of("alexdist.data.batches")  # the order is seen (control)
    assert all(floor_of(module_name(p)) is not None for p in MODULES)


STRATEGY_NAME = re.compile(r"""(==|!=)\s*["'](ddp|deepspeed|fsdp)["']|["'](ddp|deepspeed|fsdp)["']\s*(==|!=)""")


def test_no_strategy_name_is_compared_outside_distributed():
    found = [f"{p.relative_to(PACKAGE)}:{n}" for p in MODULES if "distributed" not in p.parts
             for n, line in enumerate(p.read_text().splitlines(), 1) if STRATEGY_NAME.search(line)]
    assert not found, found
    assert STRATEGY_NAME.search('if strategy == "fsdp":')  # the pattern finds one (control)


def test_no_function_is_longer_than_60_lines_and_no_module_longer_than_400():
    files = MODULES + sorted((PACKAGE.parent / "benchmarks").glob("*.py"))
    long_functions = [f"{p.relative_to(PACKAGE.parent)}:{node.name} ({node.end_lineno - node.lineno + 1})"
                      for p in files for node in ast.walk(ast.parse(p.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 60]
    assert not long_functions, long_functions
    long_modules = [f"{p.relative_to(PACKAGE.parent)} ({n})" for p in files
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


MENTION = re.compile(r"(?<![\w/.])(?:alexdist|tests)/[\w/]+\.py|(?<![\w/.-])alexdist(?:\.[a-z_][a-z0-9_]*)+")
FROM_IMPORT = re.compile(r"from (alexdist(?:\.\w+)*) import (\([^)]*\)|[\w ,]+)")  # every name imported must exist


def _exists(mention: str) -> bool:
    """Whether a path (alexdist/x/y.py) or a dotted name (alexdist.x.y, possibly ending in an attribute) names
    something in the package."""
    root = PACKAGE.parent
    if "/" in mention:  # alexdist/x.py or tests/unit/test_x.py
        return (root / mention).is_file()
    parts = mention.split(".")
    for n in range(len(parts), 0, -1):  # the longest prefix that is a module; the rest must be an attribute of it
        path = root.joinpath(*parts[:n])
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            if n == len(parts):
                return True
            module = importlib.import_module(".".join(parts[:n]))
            return hasattr(module, parts[n])
    return False


def test_every_module_the_code_and_docs_mention_exists():
    """Comments, docstrings, docs and recipes named modules of the old flat layouts (alexdist/ema.py,
    alexdist.compare, tests/test_fsdp.py, ...); every `alexdist/....py` or `tests/....py` path, `alexdist.x.y` name
    and `from alexdist.x import y` they give must exist."""
    root = PACKAGE.parent
    texts = [*MODULES, *sorted((root / "docs").rglob("*.md")), *sorted((root / "benchmarks").glob("*.py")),
             *sorted(f for f in (root / "tests").rglob("*.py") if f.name != "test_architecture.py"),
             *sorted(PACKAGE.rglob("*.yaml")), root / "README.md",
             root / "DEVELOPERS.md", *sorted((root / "slurm").rglob("*")), *sorted((root / "docker").glob("*"))]
    read = {p: p.read_text(errors="ignore") for p in texts if p.is_file() and p.suffix != ".whl"}
    mentions = {(p, m) for p, text in read.items() for m in MENTION.findall(text)}
    mentions |= {(p, f"{module}.{name.split(' as ')[0].strip()}") for p, text in read.items()
                 for module, names in FROM_IMPORT.findall(text) for name in names.strip("()").split(",")
                 if name.strip()}
    stale = sorted(f"{p.relative_to(root)}: {m}" for p, m in mentions if not _exists(m.rstrip(".")))
    assert not stale, stale
    assert not _exists("alexdist.compare") and _exists("alexdist.tracking.compare.build_row")  # (control)
    assert not _exists("alexdist.checkpoint.run_dir.check_space") and not _exists("tests/test_fsdp.py")  # (controls)


STARTS_A_PROCESS = re.compile(r"\bimport (subprocess|multiprocessing)|\b(Popen|worker_report|launch|os\.fork)\("
                              r"|torch\.distributed\.run")


def test_the_tests_folder_says_their_kind_unit_tests_start_no_process():
    """tests/unit runs in this process (seconds each); anything launched (a training run, torchrun, a cluster job,
    an elastic agent, docker) lives in tests/e2e; no test file outside the two."""
    tests = ROOT / "tests"
    assert not sorted(tests.glob("test_*.py")), "a test file outside tests/unit and tests/e2e"
    launching = sorted(p.name for p in (tests / "unit").glob("test_*.py")
                       if p.name != "test_architecture.py" and STARTS_A_PROCESS.search(p.read_text()))
    assert not launching, f"unit tests that start processes (move them to tests/e2e): {launching}"
    e2e = [p for p in (tests / "e2e").glob("test_*.py") if STARTS_A_PROCESS.search(p.read_text())]
    assert len(e2e) >= 0.9 * len(list((tests / "e2e").glob("test_*.py")))  # it sees how tests launch (control)
