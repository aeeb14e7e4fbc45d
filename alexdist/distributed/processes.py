"""Process lives: run a launcher with a time limit and leave nothing behind when it is cut short; a worker that
does not outlive its launcher (die_with_launcher); and leaving without interpreter teardown (exit_now).

`torchrun` (and `accelerate launch`, which runs it) starts each worker in a session of its own, so killing the
launcher's process group misses the workers: they live on, holding GPUs. Here the whole tree is found through
/proc before anything is killed, stopped so it cannot fork further, and killed. Linux only (/proc).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


def children_of(pid: int) -> list[int]:
    """Every live descendant of `pid` (through /proc's parent links), nearest first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid` and all its descendants; returns the pids signalled. The tree is frozen (SIGSTOP) first, and
    looked at again, so that a process forked meanwhile is caught too."""
    tree = [pid, *children_of(pid)]
    for _ in range(2):
        for p in tree:
            _signal(p, signal.SIGSTOP)
        tree = list(dict.fromkeys(tree + [c for p in tree for c in children_of(p)]))
    for p in tree:
        _signal(p, signal.SIGKILL)
    return tree


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone already, or not ours
        os.kill(pid, sig)


def run_bounded(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) that, past `timeout` seconds, kills the command's
    whole process tree (kill_tree) before raising subprocess.TimeoutExpired."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The signal a worker asks the kernel for when its launcher dies: one of its own, so that receiving it *is* the
# news that the launcher is gone, whatever getppid() says at that instant (the kernel signals when the launcher's
# forking *thread* exits; the process's other threads may still be alive, so the worker is first handed to a
# sibling thread of the same pid). Not SIGTERM (schedulers' and launchers' plain stop) nor SIGHUP (a hang-up, which
# torchrun passes on to its workers and `nohup` makes a process ignore, its workers too if the launcher leaves it
# alone): a real-time signal, which no terminal, scheduler or launcher sends, whose default action terminates (a worker
# that has not yet installed its handler still ends with its launcher); +6 keeps clear of the first and last few,
# which libraries that borrow one tend to take. None where the platform has none (not Linux).
_DEATH_OFFSET = 6
LAUNCHER_DEATH_SIGNAL: int | None = signal.SIGRTMIN + _DEATH_OFFSET if hasattr(signal, "SIGRTMIN") else None
LAUNCHER_DEATH_SIGNAL_NAME = f"SIGRTMIN+{_DEATH_OFFSET}"
_armed = False  # whether this process asked for LAUNCHER_DEATH_SIGNAL (stop_requests names the reason by it)


def die_with_launcher(parent_at_start: int) -> None:
    """Under a launcher (torchrun, accelerate launch, srun's torchrun), have the kernel send this worker
    LAUNCHER_DEATH_SIGNAL when the launcher dies (PR_SET_PDEATHSIG), so that no worker outlives it: SIGKILLed
    launchers (an OOM kill, a closed session, a crashed agent) otherwise leave their workers running on alone,
    holding the GPUs and the run directory. During setup the signal ends the worker at once; from the
    stop-request handler on (training) it is a stop request: checkpoint at the next step, exit 75, and the
    relaunch resumes. Linux only; called first thing, before the heavy imports.

    `parent_at_start`: os.getppid() as early as this process ran any of our code. The request only covers a
    death after it takes effect; a launcher that died before has already handed this worker to a reaper, so
    the parent differs now. Comparing with the parent recorded at start is right in every case where a fixed
    pid is not: the launcher may *be* PID 1 (a container's entrypoint, a PyTorchJob's torchrun), and an orphan's
    new parent may not be PID 1 (a subreaper: systemd, slurmstepd)."""
    global _armed
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    from alexdist import faults

    faults.slow_setup_point("slow_start")
    with contextlib.suppress(ValueError):  # not the main thread: what it inherited stays
        signal.signal(LAUNCHER_DEATH_SIGNAL, signal.SIG_DFL)  # an inherited ignore would keep the orphan alive
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, LAUNCHER_DEATH_SIGNAL, 0, 0, 0) != 0:
        return  # not permitted here: the stop request at the next step is the only way out
    _armed = True
    if os.getppid() != parent_at_start:  # the launcher died before the request took effect: already an orphan
        os.kill(os.getpid(), LAUNCHER_DEATH_SIGNAL)


def launcher_death_armed() -> bool:
    """Whether this process asked the kernel for LAUNCHER_DEATH_SIGNAL when its launcher dies."""
    return _armed


def exit_now(code: int) -> None:
    """Leave without running interpreter teardown.

    With gloo, about 1 run in 8 aborts at interpreter exit ("terminate called without an active exception",
    pytorch#190489: a gloo thread outlives the Python objects it refers to), after training has finished.
    Everything we write is closed and flushed before this is called, so skipping teardown loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
