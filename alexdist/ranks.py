"""What the launcher (`torchrun`, `accelerate launch`, srun's torchrun) told this process: its rank and the world
size, read from the environment before any process group exists (error reporting, fault injection, a recipe's
deprecation notices) and without torch."""

from __future__ import annotations

import os


def launch_rank() -> int:
    """This process's global rank as announced by the launcher (0 when started without one)."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """World size announced by the launcher, before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))
