"""User-facing errors: each carries one line that says what is wrong and how to fix it.

The entry points catch `AlexdistError`, print `alexdist: error: <message>` once and exit with `exit_code`,
instead of a traceback.
"""


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
