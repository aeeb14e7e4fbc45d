"""User-facing errors: each carries one line that says what is wrong and how to fix it.

The entry points catch `AlexdistError`, print `alexdist: error: <message>` once and exit with `exit_code`,
instead of a traceback.
"""


def brief(exc: BaseException, limit: int = 160) -> str:
    """`Type: first sentence` of a library's exception, for inclusion in a one-line message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class AlexdistError(Exception):
    exit_code = 1


class ConfigError(AlexdistError):
    """The recipe or an override is invalid (exit code 2, like argparse)."""

    exit_code = 2


class DataError(AlexdistError):
    """A dataset source is missing, unreadable or in an unknown layout."""

    exit_code = 3


class SetupError(AlexdistError):
    """The machine can't run what the recipe asks (e.g. fp16 without a GPU)."""

    exit_code = 4


class CheckpointError(AlexdistError):
    """A checkpoint can't be written or read (disk full, unwritable, truncated, unsafe, another model's)."""

    exit_code = 5


class DivergedError(AlexdistError):
    """Training produced non-finite losses/gradients for too long; the last good checkpoint is kept."""

    exit_code = 6
