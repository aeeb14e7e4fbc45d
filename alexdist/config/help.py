"""Every recipe key, described from the schema itself (so the help cannot drift from the code): the resolved
recipe as YAML with each key's default, allowed values and description (`alexdist config RECIPE`), and the
sections' overview `alexdist train --help` shows."""

from __future__ import annotations

import shutil
import textwrap
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from alexdist.config.schema import Recipe

BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def allowed(field: FieldInfo) -> str:
    """The values a key takes, in a few words: its choices, or its type and bounds."""
    ann = field.annotation
    args = typing.get_args(ann)
    if typing.get_origin(ann) is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if typing.get_origin(ann) is list:
        inner = typing.get_args(args[0]) if typing.get_origin(args[0]) is Literal else ()
        return "a list" + (f" of {', '.join(inner)}" if inner else "")
    names = [getattr(a, "__name__", str(a)) for a in (args or (ann,))]
    kinds = " or ".join("null" if n == "NoneType" else n for n in names)
    bounds = [f"{BOUNDS[k]} {getattr(m, k)}" for m in field.metadata for k in BOUNDS if hasattr(m, k)]
    return kinds + (f", {' and '.join(bounds)}" if bounds else "")


def terminal_width() -> int:
    """The terminal's columns ($COLUMNS first); 100 when not a terminal (a pipe, a file), never under 40."""
    return max(40, shutil.get_terminal_size((100, 24)).columns)


def _commented(head: str, text: str, indent: str, width: int) -> list[str]:
    """`head  # text`, the comment wrapped at word boundaries onto `indent  # ...` lines; no word is cut, so a
    line can only pass `width` where one word (a long value or path) does."""
    wrapper = textwrap.TextWrapper(width=width, initial_indent=f"{head}  # ", subsequent_indent=f"{indent}  # ",
                                   break_long_words=False, break_on_hyphens=False)
    return wrapper.wrap(" ".join((text or "").split())) or [head]


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def describe(model: type[BaseModel], values: dict, width: int, indent: str = "") -> list[str]:
    """YAML lines of a section: each key with its value, and a comment: default, allowed values, description
    (whole, wrapped to `width`)."""
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += _commented(f"{indent}{name}:", field.description, indent, width)
            lines += describe(ann, values[name], width, indent + "  ")
            continue
        default = field.get_default(call_default_factory=True)
        note = f"default {_scalar(default)}; {allowed(field)}. {field.description or ''}"
        lines += _commented(f"{indent}{name}: {_scalar(values[name])}", note, indent, width)
    return lines


def recipe_yaml(recipe: Recipe, title: str, width: int | None = None) -> str:
    """The resolved recipe, every key, as YAML a recipe file can start from; comments wrapped to `width` (the
    terminal's by default)."""
    width = width or terminal_width()
    heading = textwrap.wrap(title, width, initial_indent="# ", subsequent_indent="# ", break_long_words=False,
                            break_on_hyphens=False)
    return "\n".join([*heading, *describe(Recipe, recipe.to_dict(), width)]) + "\n"


def sections_help() -> str:
    """One line per section, for `alexdist train --help`."""
    rows = [(name, f.description) for name, f in Recipe.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]
    top = [name for name, f in Recipe.model_fields.items() if not (isinstance(f.annotation, type)
                                                                    and issubclass(f.annotation, BaseModel))]
    return "\n".join([*(f"  {name:<12} {desc}" for name, desc in rows),
                      f"  {'(top level)':<12} {', '.join(top)}"])
