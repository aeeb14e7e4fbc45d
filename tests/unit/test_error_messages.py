"""The free-space check a run makes before it trains and before a ZeRO universal conversion: a need larger than
the disk's free space is refused with both figures, a small one passes. (Every other message, run as a user
runs it: tests/e2e/test_error_messages.py.)"""

from __future__ import annotations

import pytest


def test_free_space_is_checked_before_training(tmp_path):
    from alexdist.errors import CheckpointError
    from alexdist.fileio import check_space

    with pytest.raises(CheckpointError, match="MiB free but this run needs about"):
        check_space(tmp_path, 2**60)
    check_space(tmp_path, 1)
