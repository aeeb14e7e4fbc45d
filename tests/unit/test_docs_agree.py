"""The user's pages (README.md and docs/*.md) agree with the code and with each other: every recipe key they name
exists in the schema under its current name; every relative link reaches a file and every #anchor a heading; the
quickstart's figures in the README agree with each other, with its recipe and with docs/; tables copied from a
generated file (the benchmark summary, `alexdist models`, the steps-to-target study) hold what it holds. Each
check is a function of the text, so a control can feed it a page that is wrong."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from pydantic import BaseModel

from alexdist.config import load_recipe, recipe_summary, shipped_recipes
from alexdist.config.loading import DEPRECATED_KEYS
from alexdist.config.schema import Recipe

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FILE_SUFFIXES = {"safetensors", "json", "jsonl", "yaml", "md", "py", "png", "sh", "pt", "bin", "pkl", "txt"}


def schema_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> set[str]:
    """Every dotted key of a recipe, sections included (`distributed.deepspeed` and its leaves)."""
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= schema_keys(field.annotation, f"{prefix}{name}.")
    return keys


KEYS = schema_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})
# `train.epochs`, `distributed.deepspeed.zero_stage`, `tracking.*`, `train.ema_*`; not `alexdist.train`,
# `alexdist/train.py` or `model.safetensors`.
DOTTED = re.compile(r"(?<![\w./-])((?:" + "|".join(SECTIONS) + r")(?:\.\w+)+)(\*?)")


def unknown_keys(text: str) -> list[str]:
    """The dotted recipe keys a page names that the schema does not have (a misspelt key shown as the example of
    the unknown-key message is meant)."""
    wrong = []
    for m in DOTTED.finditer(text):
        key, star = m.groups()
        if key.rsplit(".", 1)[1] in FILE_SUFFIXES or text[:m.start()].endswith("unknown key '"):
            continue
        if not (key in KEYS or (star and any(k.startswith(key) for k in KEYS))):
            wrong.append(key)
    return wrong


def deprecated_names(text: str) -> list[str]:
    """The deprecated key names a page uses: the old dotted name, or an old last part that no key has any more
    written as an override or a code span (`timeout_s=10`)."""
    leaves = {k.rsplit(".", 1)[-1] for k in KEYS}
    found = [old for old in DEPRECATED_KEYS if re.search(rf"(?<![\w.]){re.escape(old)}(?![\w])", text)]
    for old in DEPRECATED_KEYS:
        leaf = old.rsplit(".", 1)[1]
        if leaf not in leaves and re.search(rf"`{re.escape(leaf)}(=[^`]*)?`", text):
            found.append(leaf)
    return found


def without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (where `[a](b)` is not a link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens, a repeated
    heading numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).splitlines():
        if m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(page: Path, text: str) -> list[str]:
    """Relative links (and images) of a page that reach no file, and #anchors that reach no heading."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_code(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        missing_anchor = dest.exists() and anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text())
        if not dest.exists() or missing_anchor:
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_recipe_key_a_page_names_exists_under_its_current_name(page):
    text = page.read_text()
    assert not unknown_keys(text), f"{page.name} names keys the schema lacks: {unknown_keys(text)}"
    assert not deprecated_names(text), f"{page.name} uses deprecated names: {deprecated_names(text)}"


def test_the_key_checks_catch_a_made_up_key_and_a_deprecated_one():
    assert unknown_keys("set `train.epochz=3` or `optim.lr=0.1`") == ["train.epochz"]
    assert unknown_keys("`distributed.deepspeed.zero_stag=2`, `distributed.deepspeed.zero_stage=2`") == [
        "distributed.deepspeed.zero_stag"]
    assert unknown_keys("`tracking.*`, `train.ema_*` and `model.safetensors`, `alexdist.train`") == []
    assert unknown_keys("`speed.turbo_*`") == ["speed.turbo_"]
    assert unknown_keys("unknown key 'train.epocs'; did you mean 'train.epochs'?") == []
    assert deprecated_names("(measured with `timeout_s=10`)") == ["timeout_s"]
    assert deprecated_names("set distributed.zero_stage=2") == ["distributed.zero_stage"]
    assert deprecated_names("`distributed.step_timeout_s=10`, `distributed.deepspeed.zero_stage`") == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_of_a_page_resolves(page):
    assert not broken_links(page, page.read_text())


def test_the_link_check_catches_a_missing_file_and_a_missing_anchor():
    page = ROOT / "docs" / "tracking.md"
    text = ("[ok](../README.md) [ok](checkpoints.md#checkpoints-and-resume) [ok](#comparing-runs) "
            "[gone](no-such-page.md) [bad anchor](performance.md#gpu-check) ![gone](compare/nope.png) "
            "[web](https://example.com) `[not a link](nowhere.md)`")
    assert broken_links(page, text) == ["no-such-page.md", "performance.md#gpu-check", "compare/nope.png"]
    assert {"the-gpu-check", "a-b", "a-b-1", "hang-ups-and-nohup"} <= anchors(
        "## The GPU check\n# A, b\n## A b\n```\n# not a heading\n```\n### Hang-ups and nohup\n")


# The quickstart's figures. The README states its last line (accuracy, step) and the recipe table its accuracy;
# docs/data.md the digits' split; docs/tracking.md the same run among the others.

def quickstart_figures(readme: str) -> dict:
    done = re.search(r"`alexdist: done at step (\d+) \| final test acc ([\d.]+)", readme)
    row = re.search(r"^\| `quickstart` \|.*?\| ([\d.]+) % on digits", readme, re.M)
    took = re.search(r"^make quickstart .*offline \(([^)]+)\)", readme, re.M)
    assert done and row and took, "the README's quickstart line, recipe-table row or duration moved"
    return {"step": int(done.group(1)), "final_acc": float(done.group(2)), "table_pct": float(row.group(1)),
            "took": took.group(1)}


def quickstart_disagreements(readme: str, data_md: str, tracking_md: str) -> list[str]:
    f = quickstart_figures(readme)
    train, test = (int(n.replace(",", "")) for n in re.search(
        r"`digits`: .*?\(real data, ([\d,]+) train / ([\d,]+) test\)", data_md).groups())
    r = load_recipe("quickstart")
    wrong = []
    if round(100 * f["final_acc"], 1) != f["table_pct"]:
        wrong.append(f"done line's final test acc {f['final_acc']} vs the recipe table's {f['table_pct']} %")
    if round(f["final_acc"] * test) / test != pytest.approx(f["final_acc"], abs=5e-5):
        wrong.append(f"final test acc {f['final_acc']} is no count of {test} test images")
    steps = r.train.epochs * (train // (r.train.batch_size * 2))  # 2 processes, the last partial batch dropped
    if f["step"] != steps:
        wrong.append(f"done at step {f['step']}, the recipe trains {steps} steps")
    if f"in {f['took']}" not in recipe_summary(shipped_recipes()["quickstart"]):
        wrong.append(f"the README says the quickstart takes {f['took']!r}, its recipe says otherwise")
    row = re.search(r"^\| \S+ \| alexnet_bn \| ddp \| 2 \| no \| 64 \|.*$", tracking_md, re.M)
    if not row or f"| {f['final_acc']:.4f} |" not in row.group(0):
        wrong.append("docs/tracking.md's quickstart row does not end at the README's final test acc")
    return wrong


def test_the_quickstarts_figures_agree_across_the_readme_its_recipe_and_docs():
    pages = (ROOT / "README.md", ROOT / "docs" / "data.md", ROOT / "docs" / "tracking.md")
    assert quickstart_disagreements(*(p.read_text() for p in pages)) == []


def test_the_quickstart_check_catches_figures_that_disagree():
    readme, data_md, tracking_md = ((ROOT / p).read_text() for p in ("README.md", "docs/data.md", "docs/tracking.md"))
    f = quickstart_figures(readme)
    other_acc = readme.replace(f"final test acc {f['final_acc']}", "final test acc 0.9916")
    assert any("recipe table" in w for w in quickstart_disagreements(other_acc, data_md, tracking_md))
    other_time = readme.replace(f"offline ({f['took']})", "offline (~30 s)")
    assert any("takes" in w for w in quickstart_disagreements(other_time, data_md, tracking_md))
    other_step = readme.replace(f"done at step {f['step']}", "done at step 270")
    assert any("step 270" in w for w in quickstart_disagreements(other_step, data_md, tracking_md))


def quickstart_command(readme: str, makefile: str) -> tuple[str, str]:
    """The command the README says `make quickstart` runs, and the one the Makefile runs ($(BIN) = .venv/bin)."""
    shown = re.search(r"`make quickstart` runs exactly:\s*```bash\n(.*?)```", readme, re.S).group(1)
    made = makefile.split("\nquickstart:")[1].split("\n\n")[0].split("\n", 1)[1]

    def flat(cmd: str) -> str:
        return " ".join(cmd.replace("\\\n", " ").replace("$(BIN)", ".venv/bin").split())
    return flat(shown), flat(made)


def test_the_readme_shows_the_command_make_quickstart_runs():
    shown, made = quickstart_command((ROOT / "README.md").read_text(), (ROOT / "Makefile").read_text())
    assert shown == made


def test_the_quickstart_command_check_sees_a_missing_variable():
    readme = (ROOT / "README.md").read_text().replace("CUDA_VISIBLE_DEVICES= .venv/bin/", ".venv/bin/")
    shown, made = quickstart_command(readme, (ROOT / "Makefile").read_text())
    assert shown != made and made.startswith("CUDA_VISIBLE_DEVICES= .venv/bin/accelerate launch")


# Tables that copy a generated file.

def table_rows(text: str, header_start: str) -> list[str]:
    """The rows of the first markdown table whose header begins with `header_start`, header included."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line.strip())
    return rows


def test_the_benchmark_table_in_docs_performance_is_summary_mds():
    summary = (ROOT / "benchmarks" / "results" / "SUMMARY.md").read_text()
    perf = (ROOT / "docs" / "performance.md").read_text()
    assert table_rows(perf, "| benchmark |") == table_rows(summary, "| benchmark |")


def documented_defaults(text: str) -> dict[str, str]:
    """`key` -> default, from every table of a page whose header starts `| key | default |`."""
    out, in_table = {}, False
    for line in text.splitlines():
        if line.startswith("| key | default |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and (m := re.match(r"\| `([\w.]+)` \| ([^|]+) \|", line)):
            out[m.group(1)] = m.group(2).strip()
    return out


def default_of(key: str) -> str:
    node: object = Recipe()
    for part in key.split("."):
        node = getattr(node, part)
    return str(node).lower() if isinstance(node, bool) else str(node)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_defaults_a_page_tabulates_are_the_schemas(page):
    table = documented_defaults(page.read_text())
    assert {k: v for k, v in table.items() if default_of(k) != v} == {}, {k: default_of(k) for k in table}


def test_the_defaults_check_reads_a_key_default_table():
    text = ("| key | default | what it does |\n|---|---|---|\n| `speed.tf32` | false | ... |\n"
            "| `train.log_every` | 50 | |\n")
    assert documented_defaults(text) == {"speed.tf32": "false", "train.log_every": "50"}
    assert default_of("speed.tf32") == "true" and default_of("train.log_every") == "50"


def test_the_models_table_in_docs_evaluation_is_what_alexdist_models_prints():
    from alexdist.models import describe_models

    rows = table_rows((ROOT / "docs" / "evaluation.md").read_text(), "| model | default input |")[2:]
    expected = [f"| `{r['name']}` | {r['input_size']} | {r['params']:,} | {r['gflops']:.3f} |"
                for r in describe_models(None)]
    assert rows == expected


def test_the_readmes_recipe_table_quotes_the_steps_to_target_study():
    """Steps to target and test accuracy per batch, in the README's recipe table, are the study's (its table:
    benchmarks/results/steps_to_target/README.md)."""
    study = (ROOT / "benchmarks" / "results" / "steps_to_target" / "README.md").read_text()
    runs: dict[str, list[tuple[int, int, float]]] = {}
    for row in table_rows(study, "| recipe | rule | batch |")[2:]:
        recipe, _, batch, steps, _, _, test, *_ = (c.strip() for c in row.strip("|").split("|"))
        runs.setdefault(recipe, []).append((int(batch), int(steps), float(test)))
    readme = (ROOT / "README.md").read_text()
    for recipe, points in runs.items():
        points.sort()
        row = re.search(rf"^\| `{recipe}` \|.*$", readme, re.M).group(0)
        steps = " / ".join(f"{s:,}" for _, s, _ in points)
        batches = " / ".join(str(b) for b, _, _ in points)
        tests = " / ".join(f"{t:.1f}" for _, _, t in points)
        assert f"{steps} steps at batch {batches} (test {tests} %)" in row, recipe


def test_the_studys_shipped_rules_are_what_the_recipe_files_hold():
    """benchmarks/recipes.py's SHIPPED names each recipe's rule: applied to the recipe as overrides, it changes
    nothing."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from recipes import SHIPPED, rule_overrides

    for name, rule in SHIPPED.items():
        assert load_recipe(name, rule_overrides(rule)).to_dict() == load_recipe(name).to_dict(), name
