"""DeepSpeed builds its CPU op with the environment's own ninja, whatever PATH the job was started with.

Two ninja versions (pip's 1.13 in the environment, Debian's 1.11) rebuild each other's build of the op: measured
on a 2-core AMD EPYC machine, each switch cost 175-195 s of rebuild under load, against 0.2 s to load the built
op, and every rank of every ZeRO job waited on that build's lock (docs/development.md).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from alexdist.distributed.deepspeed import environment_tools_first

BINDIR = str(Path(sys.executable).parent)


def test_the_environments_bin_folder_goes_first_on_a_path_that_lacks_it(monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"]))
    environment_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == [BINDIR, "/usr/local/bin", "/usr/bin", "/bin"]


def test_a_path_that_already_holds_it_later_gets_it_once_and_first(monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", BINDIR, "/bin"]))
    environment_tools_first()
    environment_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == [BINDIR, "/usr/bin", "/bin"]


@pytest.mark.skipif(not (Path(BINDIR) / "ninja").exists(), reason="this environment has no ninja of its own")
def test_the_ninja_that_builds_the_op_is_the_environments_not_the_systems(monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"]))
    before = shutil.which("ninja")  # the system's, or none: the control
    environment_tools_first()
    assert shutil.which("ninja") == str(Path(BINDIR) / "ninja") != before
