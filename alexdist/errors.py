"""User-facing errors: each carries one line that says what is wrong and how to fix it.

Every command's `main` runs its work through `run_command`, which catches `AlexdistError`, prints
`alexdist: error: <message>` once and returns the error's exit code, instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable

from alexdist.ranks import launch_rank, launched_world_size


def brief(exc: BaseException, limit: int = 160) -> str:
    """`Type: first sentence` of a library's exception, for inclusion in a one-line message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class AlexdistError(Exception):
    """An error the user can fix; `exit_code` tells scripts which kind (docs/errors.md lists every message)."""

    exit_code = 1

    def __init_subclass__(cls, exit_code: int = 1, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.exit_code = exit_code


class ConfigError(AlexdistError, exit_code=2):
    """The recipe or an override is invalid (exit code 2, like argparse)."""


class DataError(AlexdistError, exit_code=3):
    """A dataset source, weights file or image is missing, unreadable or in an unknown layout."""


class SetupError(AlexdistError, exit_code=4):
    """The machine can't run what the recipe asks (e.g. fp16 without a GPU)."""


class CheckpointError(AlexdistError, exit_code=5):
    """A checkpoint can't be written or read (disk full, unwritable, truncated, unsafe, another model's)."""


class DivergedError(AlexdistError, exit_code=6):
    """Training produced non-finite losses/gradients for too long; the last good checkpoint is kept."""


def require_extra(extra: str, feature: str, *modules: str) -> None:
    """Import `modules` (the packages of pyproject.toml's extra `extra`); where one is missing or does not import,
    a SetupError that names the feature, the package (and why) and the command that installs the extra, in one
    line."""
    for name in modules:
        # Any failure to import, not only ImportError: an installed but broken extra raises what its loader raises
        # (OSError for a missing shared library, RuntimeError for a binary built against another numpy), and the
        # fix is the same, the extra's install; its cause is shown.
        try:
            importlib.import_module(name)
        except Exception as exc:
            what = (f"{exc.name} is not installed" if isinstance(exc, ModuleNotFoundError) and exc.name
                    else f"{name} does not import ({brief(exc)})")
            raise SetupError(f"{feature} needs the '{extra}' extra ({what}): pip install 'alexdist[{extra}]'") from None


# "Stopped on request, resumable" (EX_TEMPFAIL): the run saved a checkpoint and `resume: auto` continues it.
STOPPED_EXIT_CODE = 75


def run_command(body: Callable[[], int]) -> int:
    """Run a command's body; an AlexdistError becomes one line on stderr and its exit code.

    Under a launcher every rank usually hits the same error: rank 0 says it once. The launcher kills the other
    ranks as soon as one exits, so the others wait a moment before exiting, or rank 0 could be killed before it
    has said anything.
    """
    try:
        return body()
    except AlexdistError as exc:
        if launch_rank() == 0:
            print(f"alexdist: error: {exc}", file=sys.stderr)
        elif launched_world_size() > 1:
            time.sleep(3)
        return exc.exit_code
