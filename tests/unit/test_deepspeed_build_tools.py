"""DeepSpeed builds its CPU op with the environment's own ninja, whatever PATH the job was started with.

Two ninja versions (pip's 1.13 in the environment, Debian's 1.11) rebuild each other's build of the op: measured
on a 2-core AMD EPYC machine, each switch cost 175-195 s of rebuild under load, against 0.2 s to load the built
op, and every rank of every ZeRO job waited on that build's lock (docs/development.md).

Only a virtual environment's own ninja is put first: a system Python's folder (/usr/bin) must not go before a
cluster's module-loaded compilers, and PATH never gains the working directory.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from alexdist.distributed.deepspeed import environment_tools_first

BINDIR = str(Path(sys.executable).parent)
SYSTEM_PATH = ["/opt/modules/gcc-13/bin", "/usr/local/bin", "/usr/bin", "/bin"]  # a module-loaded compiler first


def _venv(tmp_path: Path, monkeypatch, ninja: bool = True) -> str:
    """This process as if it ran in a virtual environment at tmp_path/venv (with or without its own ninja);
    returns the environment's bin folder."""
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python").touch(mode=0o755)
    if ninja:
        (bindir / "ninja").touch(mode=0o755)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    return str(bindir)


def test_the_environments_bin_folder_goes_first_on_a_path_that_lacks_it(tmp_path, monkeypatch):
    bindir = _venv(tmp_path, monkeypatch)
    monkeypatch.setenv("PATH", os.pathsep.join(SYSTEM_PATH))
    environment_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == [bindir, *SYSTEM_PATH]


def test_a_path_that_already_holds_it_later_gets_it_once_and_first(tmp_path, monkeypatch):
    bindir = _venv(tmp_path, monkeypatch)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", bindir, "/bin"]))
    environment_tools_first()
    environment_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == [bindir, "/usr/bin", "/bin"]


def test_a_system_python_leaves_path_alone_so_module_loaded_compilers_stay_first(monkeypatch):
    monkeypatch.setattr(sys, "prefix", "/usr")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    monkeypatch.setenv("PATH", os.pathsep.join(SYSTEM_PATH))
    environment_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == SYSTEM_PATH


def test_a_virtual_environment_without_its_own_ninja_leaves_path_alone(tmp_path, monkeypatch):
    _venv(tmp_path, monkeypatch, ninja=False)
    monkeypatch.setenv("PATH", os.pathsep.join(SYSTEM_PATH))
    environment_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == SYSTEM_PATH


def test_an_unset_path_keeps_the_default_search_path_after_the_environment(tmp_path, monkeypatch):
    bindir = _venv(tmp_path, monkeypatch)
    monkeypatch.delenv("PATH", raising=False)
    environment_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == [bindir, *os.defpath.split(os.pathsep)]


def test_an_empty_interpreter_path_never_puts_the_working_directory_on_path(tmp_path, monkeypatch):
    bindir = _venv(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "executable", "")  # Python could not tell where it runs from
    monkeypatch.setenv("PATH", os.pathsep.join(SYSTEM_PATH))
    environment_tools_first()
    parts = os.environ["PATH"].split(os.pathsep)
    assert "" not in parts and "." not in parts and all(Path(p).is_absolute() for p in parts)
    assert parts == [bindir, *SYSTEM_PATH]


@pytest.mark.skipif(sys.prefix == sys.base_prefix or not (Path(BINDIR) / "ninja").exists(),
                    reason="this environment has no ninja of its own")
def test_the_ninja_that_builds_the_op_is_the_environments_not_the_systems(monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"]))
    before = shutil.which("ninja")  # the system's, or none: the control
    environment_tools_first()
    assert shutil.which("ninja") == str(Path(BINDIR) / "ninja") != before
