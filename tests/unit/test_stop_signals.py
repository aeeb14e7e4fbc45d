"""Which signals stop a run, and what the stop says: SIGHUP ignored at start (`nohup`) stays ignored, a SIGHUP that
is not is a stop named as a hang-up, and the launcher's death comes by a signal of its own, named as such."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from alexdist.distributed import processes
from alexdist.distributed.processes import LAUNCHER_DEATH_SIGNAL
from alexdist.training.stop_requests import StopRequests, signal_reason

ACCELERATOR = SimpleNamespace(device="cpu", is_main_process=False)  # all StopRequests reads before a step


@pytest.fixture
def handlers():
    """Put back the handlers a StopRequests installs."""
    sigs = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, LAUNCHER_DEATH_SIGNAL)
    saved = {s: signal.getsignal(s) for s in sigs}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_an_ignored_sighup_stays_ignored_and_one_that_is_not_becomes_a_hangup_stop(tmp_path, handlers):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup` starts the run
    StopRequests(ACCELERATOR, tmp_path)
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    stops = StopRequests(ACCELERATOR, tmp_path)
    signal.raise_signal(signal.SIGHUP)
    assert stops.reason == "the terminal closed (SIGHUP)"


def test_a_hangup_under_a_launcher_is_not_taken_for_the_launchers_death(monkeypatch):
    monkeypatch.setattr(processes, "_armed", True)  # as in a worker that asked to die with its launcher
    assert signal_reason(signal.SIGHUP) == "the terminal closed (SIGHUP)"  # torchrun passes its hang-up on
    assert LAUNCHER_DEATH_SIGNAL not in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    assert signal_reason(LAUNCHER_DEATH_SIGNAL) == "the launcher died (SIGRTMIN+6)"


def test_a_worker_that_asked_to_die_with_its_launcher_turns_its_death_signal_into_a_stop(tmp_path, handlers,
                                                                                         monkeypatch):
    monkeypatch.setattr(processes, "_armed", True)
    stops = StopRequests(ACCELERATOR, tmp_path)
    signal.raise_signal(LAUNCHER_DEATH_SIGNAL)
    assert stops.reason == "the launcher died (SIGRTMIN+6)"
