"""Reading a recipe: a YAML file (or a shipped recipe's name) plus dotted `key=value` overrides, validated before
any work starts; a bad key or value becomes one line naming it (and the nearest valid key)."""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from alexdist.config.recipes import find_recipe
from alexdist.config.schema import Recipe
from alexdist.errors import ConfigError
from alexdist.ranks import launch_rank

# Keys renamed while 0.1.0 was developed (old -> new). The old names still load, with a one-line notice each, until the
# next release.
DEPRECATED_KEYS = {
    "distributed.zero_stage": "distributed.deepspeed.zero_stage",
    "distributed.offload_optimizer": "distributed.deepspeed.offload_optimizer",
    "distributed.fp16_initial_scale_power": "distributed.deepspeed.fp16_initial_scale_power",
    "distributed.fp16_loss_scale_window": "distributed.deepspeed.fp16_loss_scale_window",
    "distributed.fp16_hysteresis": "distributed.deepspeed.fp16_hysteresis",
    "distributed.fp16_min_loss_scale": "distributed.deepspeed.fp16_min_loss_scale",
    "distributed.timeout_s": "distributed.step_timeout_s",
    "speed.profile_steps": "tracking.profile_steps",
    "train.ema_eval": "train.ema_is_model",
    "checkpoint.epoch_end": "checkpoint.at_epoch_end",
    "tracking.target_acc": "tracking.time_to_acc",
}
_MISSING = object()


def _valid_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model_cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _pop_dotted(tree: dict, dotted: str) -> Any:
    *parents, last = dotted.split(".")
    node = tree
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    return node.pop(last, _MISSING) if isinstance(node, dict) else _MISSING


def rename_deprecated(tree: dict) -> list[str]:
    """Move every deprecated key of a recipe tree to its new name, in place; one notice per key moved."""
    notices = []
    for old, new in DEPRECATED_KEYS.items():
        value = _pop_dotted(tree, old)
        if value is _MISSING:
            continue
        if _pop_dotted(tree, new) is not _MISSING:
            raise ConfigError(f"'{old}' is the deprecated name of '{new}' and both are set; keep '{new}' only")
        _set_dotted(tree, new, value)
        notices.append(f"'{old}' is deprecated: write '{new}' (the old name stops working in the next release)")
    return notices


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    if e["type"] == "extra_forbidden" and isinstance(e.get("input"), dict) and len(e["loc"]) == 1:
        sections = [k for k in Recipe.model_fields if k not in ("name", "precision", "output_dir")]
        near = difflib.get_close_matches(loc, sections, n=1, cutoff=0.5)
        hint = f"did you mean '{near[0]}'?" if near else f"sections are: {', '.join(sections)}"
        return f"unknown section '{loc}'; {hint}"
    if e["type"] == "extra_forbidden":
        valid = _valid_keys(Recipe)
        # A key put in the wrong section (train.lr) is found by its last part before any spelling neighbour
        # (which would be train.log_every).
        near = ([k for k in valid if k.rsplit(".", 1)[-1] == loc.rsplit(".", 1)[-1]]
                or difflib.get_close_matches(loc, valid, n=1, cutoff=0.5))
        named = ("one of " if len(near) > 1 else "") + ", ".join(f"'{k}'" for k in near)
        hint = f"; did you mean {named}?" if near else f"; valid keys: {', '.join(valid)}"
        return f"unknown key '{loc}'{hint}"
    if e["type"] == "value_error":
        return f"{loc + ': ' if loc else ''}{e['msg'].removeprefix('Value error, ')}"
    got = e.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"bad value for '{loc}': {e['msg'][0].lower() + e['msg'][1:]}{got_s}"


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=1` -> ("a.b", 1); values are YAML scalars, so `true`, `3`, `1e-3`, `[a, b]` and `null` work."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value (example: train.epochs=5)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe (a file or a shipped recipe's name), apply dotted overrides, validate. Raises ConfigError
    with a one-line message."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = find_recipe(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"recipe '{path}' is not valid YAML{where}: fix the syntax there") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe '{path}' must be a mapping of sections (model:, data:, train:, ...)")
        tree = loaded
        tree.setdefault("name", path.stem)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    for notice in rename_deprecated(tree):
        if launch_rank() == 0:  # once per job, not once per process
            print(f"alexdist: warning: {notice}", file=sys.stderr)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: W&B's run table, filters and parallel coordinates want flat keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def sweep_output_dir(recipe: Recipe) -> None:
    """A W&B sweep trial (started by `wandb agent`, which sets WANDB_SWEEP_ID and WANDB_RUN_ID) writes to
    output_dir/sweep-SWEEP/RUN: trials of one sweep share the recipe's output_dir, and with `resume: auto`
    each would otherwise continue the previous trial's checkpoints."""
    sweep, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and run_id and f"sweep-{sweep}" not in Path(recipe.output_dir).parts:
        recipe.output_dir = str(Path(recipe.output_dir) / f"sweep-{sweep}" / run_id)
