"""A stand-in for whatever starts a launcher (a shell, systemd, slurmstepd, a container runtime), run by
test_launcher_death.py; it prints one JSON report on stdout.

    python launcher_harness.py [--subreaper] --run-dir D --kill-at-step N -- LAUNCH COMMAND...
        start the launcher, SIGKILL it once metrics.jsonl reaches step N (or, with --kill-after-s S, S seconds
        after its workers exist), then watch its workers until they are gone. With --subreaper this process is a
        child subreaper first (prctl PR_SET_CHILD_SUBREAPER, as systemd and slurmstepd are): the orphaned
        workers become its children, not PID 1's, and it reaps them, so their exit codes are reported.

    python launcher_harness.py --thread-forks --run-dir D --kill-at-step N -- WORKER COMMAND...
        be the launcher: start one worker from a thread that ends once metrics.jsonl reaches step N while this
        process lives on. The kernel sends the parent-death signal when the forking *thread* exits, while
        getppid() still names this process (the race of a SIGKILLed multi-threaded launcher, slowed down).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for alexdist
from alexdist.distributed.launcher import free_port
from alexdist.distributed.processes import children_of

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def reached(run_dir: Path, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) >= step:
                return True
        except ValueError:  # the line the run is writing right now: read it on the next poll
            continue
    return False


def wait_until(condition, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def reap(workers: list[int], codes: dict[int, int]) -> None:
    """Collect the exit codes of adopted workers that have ended (a subreaper's duty)."""
    for pid in workers:
        if pid in codes:
            continue
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue  # not ours to reap (no subreaper): PID 1 reaps it
        if done:
            codes[pid] = os.waitstatus_to_exitcode(status)


def kill_launcher(args, cmd: list[str]) -> dict:
    if args.subreaper and ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return {"error": "prctl(PR_SET_CHILD_SUBREAPER) refused"}
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []

    def python_workers() -> bool:
        workers[:] = [p for p in children_of(launcher.pid) if "alexdist.train" in _cmdline(p)]
        return len(workers) >= args.workers

    if not wait_until(python_workers, 120):
        launcher.kill()
        return {"error": "the launcher started no workers"}
    if args.kill_after_s is not None:
        time.sleep(args.kill_after_s)
    elif not wait_until(lambda: reached(args.run_dir, args.kill_at_step), 240):
        launcher.kill()
        return {"error": f"no step {args.kill_at_step}"}
    t0 = time.time()
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    codes: dict[int, int] = {}
    parents = {pid: _ppid(pid) for pid in workers}  # whom the orphans were handed to
    # A zombie leader (state Z) may still have threads exiting: an adopter waits until it can reap them all.
    while time.time() - t0 < 60 and (any(alive(w) for w in workers) or (args.subreaper and len(codes) < len(workers))):
        reap(workers, codes)
        time.sleep(0.05)
    gone = time.time() - t0
    return {"workers": workers, "gone_s": round(gone, 2), "left": [w for w in workers if alive(w)],
            "adopted_by": sorted(set(parents.values())), "harness": os.getpid(), "exit_codes": list(codes.values())}


def thread_forks(args, cmd: list[str]) -> dict:
    # What torchrun tells a worker of a group of one.
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    box: dict = {}

    def forking_thread() -> None:
        box["proc"] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        box["reached"] = wait_until(lambda: reached(args.run_dir, args.kill_at_step), 240)
        box["t0"] = time.time()  # the thread ends here: the worker's parent-death signal fires

    thread = threading.Thread(target=forking_thread)
    thread.start()
    thread.join()
    proc = box["proc"]
    try:
        code = proc.wait(timeout=60)  # this process is alive all along: only the thread is gone
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    return {"reached": box["reached"], "exit_code": code, "gone_s": round(time.time() - box["t0"], 2)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subreaper", action="store_true")
    ap.add_argument("--thread-forks", action="store_true")
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--kill-at-step", type=int, default=1)
    ap.add_argument("--kill-after-s", type=float)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    report = thread_forks(args, cmd) if args.thread_forks else kill_launcher(args, cmd)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
