"""Fault injection for tests: kill a rank, poison a loss or fill the disk at a chosen point of a run.

    ALEXDIST_FAULT="POINT:STEPS[:RANK]"      several faults: separate them with commas

POINT is one of POINTS below; STEPS is an optimizer step `N`, a range `N-M` or `N-` (from N on); RANK is the
rank that faults (default 0, `*` for every rank). Examples:

    train:7:1            rank 1 is SIGKILLed right after optimizer step 7
    hang:7:1             rank 1 stops responding after step 7 (distributed.step_timeout_s must end the job)
    slow_setup:20        rank 0 loads the data 20 s slower (distributed.setup_timeout_s must allow for it)
    slow_start:5:*       every rank pauses 5 s between reading its launcher's pid and asking to die with it
    save.weights:8       rank 0 is SIGKILLed while saving step 8, after the weights, before the optimizer state
    nan:5-:1             rank 1's loss is NaN at every step from 5 on
    enospc:8             saving step 8 fails as if the disk were full
    lose_optimizer:5:*   a resume from step 5 zeroes the optimizer state on every rank (momentum, Adam's moments)
    universal_load:2:1   rank 1 fails to load the universal copy of ZeRO checkpoint step 2 (a resume on another
                         world size)
    stop:40              rank 0 is asked to stop during step 40 (as by SIGTERM or the STOP file): deterministic

Nothing happens unless the variable is set. A kill writes `fault-<rank>.json` (point, step, time) into the
output directory first, so a test can measure how long the other ranks take to go down.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from alexdist.ranks import launch_rank

ENV = "ALEXDIST_FAULT"
POINTS = {
    "train": "after the optimizer step",
    "eval": "during the evaluation after the step",
    "save.begin": "checkpoint directory created, nothing written",
    "save.weights": "DDP weight shards (FSDP: this rank's DCP shards) written, the rest not yet",
    "save.state": "this rank's Accelerate/DeepSpeed files written, trainer state not yet",
    "save.before_rename": "every file written and synced, checkpoint not yet renamed into place",
    "save.after_rename": "checkpoint complete, older ones not yet rotated",
    "save.rotate": "an old checkpoint marked for deletion, not yet deleted",
    "hang": "the rank stops responding after the step, without dying (sleeps)",
    "slow_setup": "the rank takes STEPS seconds longer to load its data (the others wait in a collective)",
    "slow_start": "the rank pauses STEPS seconds before it asks to die with its launcher (a launcher killed "
                  "meanwhile leaves an orphan that processes.die_with_launcher must catch)",
    "stop": "a stop request arrives during the step (as SIGTERM or output_dir/STOP would), seen at its end",
    "nan": "the loss becomes NaN (not a kill)",
    "enospc": "the checkpoint save raises 'No space left on device' (not a kill)",
    "lose_optimizer": "a resume at this step loads the weights but zeroes the optimizer state (a control: tests "
                      "show their bounds catch a resume that lost it)",
    "universal_load": "loading the universal copy of the ZeRO checkpoint of this step fails with an I/O error (not "
                      "a kill)",
}


@dataclass(frozen=True)
class Fault:
    point: str
    first: int
    last: int | None  # None: open-ended
    rank: int | None  # None: every rank

    def matches(self, point: str, step: int, rank: int) -> bool:
        return (
            self.point == point
            and step >= self.first
            and (self.last is None or step <= self.last)
            and (self.rank is None or self.rank == rank)
        )


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in POINTS:
            raise ValueError(f"{ENV}: '{item}' is not POINT:STEPS[:RANK] with POINT in {', '.join(POINTS)}")
        lo, dash, hi = parts[1].partition("-")
        first = int(lo)
        last = first if not dash else (int(hi) if hi else None)
        rank_s = parts[2] if len(parts) == 3 else "0"
        rank = None if rank_s == "*" else int(rank_s)
        faults.append(Fault(parts[0], first, last, rank))
    return faults


@lru_cache(maxsize=1)
def _active() -> tuple[Fault, ...]:
    return tuple(parse(os.environ.get(ENV, "")))


def hit(point: str, step: int) -> bool:
    return any(f.matches(point, step, launch_rank()) for f in _active())


def _record(point: str, step: int, output_dir: str | Path) -> None:
    """fault-<rank>.json: what fired, when, in which process (tests measure how long the others take)."""
    rank = launch_rank()
    record = {"point": point, "step": step, "rank": rank, "time": time.time(), "pid": os.getpid()}
    Path(output_dir, f"fault-{rank}.json").write_text(json.dumps(record))


def kill_point(point: str, step: int, output_dir: str | Path) -> None:
    """SIGKILL this process if a fault is set for this point, step and rank (no cleanup runs, as in a crash)."""
    if hit(point, step):
        _record(point, step, output_dir)
        os.kill(os.getpid(), signal.SIGKILL)


def hang_point(step: int, output_dir: str | Path) -> None:
    """Sleep for good (a rank stuck in I/O or a driver call): the others must not wait for it forever."""
    if hit("hang", step):
        _record("hang", step, output_dir)
        while True:
            time.sleep(3600)


def slow_setup_point(point: str = "slow_setup") -> None:
    """Sleep for the number of seconds a `slow_setup:SECONDS[:RANK]` fault names (a slow dataset decode), or
    another point's that counts seconds (`slow_start`)."""
    for f in _active():
        if f.point == point and (f.rank is None or f.rank == launch_rank()):
            time.sleep(f.first)


def disk_full_point(step: int) -> None:
    if hit("enospc", step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"injected by {ENV}")


def stop_point(step: int) -> str | None:
    """The reason of an injected stop request during `step` on this rank, None if none is set."""
    return f"{ENV} stop:{step}" if hit("stop", step) else None


def universal_load_point(step: int) -> None:
    """Fail this rank's load of the universal copy of checkpoint `step`, as an unreadable file would."""
    if hit("universal_load", step):
        raise OSError(errno.EIO, os.strerror(errno.EIO), f"injected by {ENV}")


def poisoned(step: int) -> bool:
    """True if this rank's loss at `step` is to be made NaN."""
    return hit("nan", step)


def lose_optimizer_point(optimizer, step: int) -> None:
    """Zero every floating tensor of the optimizer's state (not `step` counts) after a resume at `step`."""
    if not hit("lose_optimizer", step):
        return
    import torch

    inner = optimizer
    while hasattr(inner, "optimizer"):  # Accelerate's and DeepSpeed's wrappers
        inner = inner.optimizer
    with torch.no_grad():
        for state in inner.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                    value.zero_()
