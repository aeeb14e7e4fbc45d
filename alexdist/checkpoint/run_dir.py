"""The run directory: checked writable and roomy before any work, and held by one run at a time.

One run per run directory: `output_dir/.lock` names the run that holds it (host, PID namespace, pid, Slurm job
id, TorchElastic run id).

A second run started on the same output_dir (a job submitted twice) is refused with one line naming the holder.
The holder's rank 0 keeps the lock's modification time fresh from a background thread, so a holder that died
without releasing it is recognised: the directory is taken over, without manual cleanup, by
- the same Slurm job (a requeue),
- the same TorchElastic job (`torchrun --rdzv-id`), re-formed: torchrun stops every worker of a round before it
  starts the next one, so the holder, rank 0 of an earlier round, is gone even when its host is (rank 0 moves
  to another host when the host that held it is lost: ranks follow the sorted node addresses),
- any run in the holder's host and PID namespace once the holder's process is gone (a crash; a pid means
  nothing in another container's namespace, where it may even name an unrelated live process),
- any run anywhere once the lock has not been refreshed for STALE_S seconds (a lost node).
Creation is atomic (O_EXCL), which holds on local disks and NFSv3+; a takeover rewrites the file atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from alexdist.config import Recipe
from alexdist.errors import CheckpointError
from alexdist.fileio import atomic_write_text

LOCK_FILE = ".lock"
HEARTBEAT_S = 20  # how often the holder refreshes the lock
STALE_S = 120  # a lock not refreshed for this long belongs to a run that is gone


# torchrun's run id when none is given (`--rdzv-id` unset with an explicit endpoint): shared by unrelated jobs.
DEFAULT_ELASTIC_RUN = "none"


def pid_namespace() -> str | None:
    """This process's PID namespace (e.g. `pid:[4026531836]`): pids compare only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def this_run() -> dict:
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    return {"host": socket.gethostname(), "pid_ns": pid_namespace(), "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "elastic_run": elastic if elastic and elastic != DEFAULT_ELASTIC_RUN else None,
            "since": round(time.time(), 3)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def takeover_reason(holder: dict | None, age_s: float, me: dict) -> str | None:
    """Why `me` may take the directory over from `holder` (None: it may not). `age_s`: time since the lock was
    last refreshed."""
    if holder is None:
        return "the lock file was unreadable (cut short by a crash)"
    if holder.get("slurm_job") and holder.get("slurm_job") == me.get("slurm_job"):
        return "the same Slurm job, requeued"
    if holder.get("elastic_run") and holder.get("elastic_run") == me.get("elastic_run"):
        return "the same TorchElastic job, re-formed"
    pid = holder.get("pid")
    same_namespace = holder.get("host") == me["host"] and holder.get("pid_ns") == me.get("pid_ns")
    if same_namespace and (not isinstance(pid, int) or pid <= 0 or not _alive(pid)):
        return "its process is gone"
    if age_s > STALE_S:
        return f"it has not been refreshed for {age_s:.0f} s"
    return None


def describe(holder: dict, age_s: float) -> str:
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    job += f", TorchElastic run {holder['elastic_run']}" if holder.get("elastic_run") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, last seen {age_s:.0f} s ago"


class RunLock:
    """Held by rank 0 of a run for its whole life."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.me = this_run()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock; None on success, else the one-line reason the directory is busy."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, age = self._read()
            if takeover_reason(holder, age, self.me) is None:
                return (f"output_dir '{self.path.parent}' is in use by another run ({describe(holder, age)}); "
                        f"wait for it to end or choose another output_dir (a holder gone without a trace is taken "
                        f"over after {STALE_S} s)")
            atomic_write_text(self.path, json.dumps(self.me))
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.me))
        self._thread = threading.Thread(target=self._refresh, name="alexdist-runlock", daemon=True)
        self._thread.start()
        return None

    def _read(self) -> tuple[dict | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            return json.loads(self.path.read_text()), age
        except (OSError, ValueError):
            return None, 0.0

    def _refresh(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # removed or unreachable for a moment: the next beat tries again
                os.utime(self.path)

    def release(self) -> None:
        """Give the directory back, if this run still holds it."""
        self._stop.set()
        holder, _ = self._read()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)


def check_writable(output_dir: str | Path) -> None:
    """Fail before any work if output_dir can't be created or written (every rank checks for itself)."""
    d = Path(output_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        # Unique per host and process: ranks on several nodes probe the same shared directory at once.
        probe = d / f".write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"output_dir '{d}' is not writable ({exc.strerror or exc}); choose another output_dir or fix its "
            f"permissions"
        ) from None


def checkpoint_bytes(n_params: int, recipe: Recipe, master_copies: int = 0) -> int:
    """About what one checkpoint takes: fp32 weights, the optimizer's buffers, and any extra fp32 copies the
    strategy keeps (Strategy.master_copies: DeepSpeed's masters)."""
    slots = 2 if recipe.optim.name == "adamw" else (1 if recipe.optim.momentum > 0 else 0)
    return 4 * n_params * (1 + slots + master_copies)
