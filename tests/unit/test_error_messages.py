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


def test_an_installed_extra_that_fails_to_load_gets_the_one_line_hint(tmp_path, monkeypatch):
    """A broken install raises what its loader raises (OSError for a missing shared library), not ImportError."""
    from alexdist.errors import SetupError, require_extra

    (tmp_path / "broken_native_pkg.py").write_text("raise OSError('libcudart.so.12: cannot open shared object "
                                                   "file: No such file or directory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SetupError) as caught:
        require_extra("onnx", "alexdist export --onnx", "json", "broken_native_pkg")
    assert str(caught.value) == ("alexdist export --onnx needs the 'onnx' extra (broken_native_pkg does not import "
                                 "(OSError: libcudart.so.12: cannot open shared object file: No such file or "
                                 "directory)): pip install 'alexdist[onnx]'")
