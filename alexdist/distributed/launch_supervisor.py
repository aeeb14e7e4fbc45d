"""`alexdist launch`'s process work: run `accelerate launch` as a child, show its stderr through LauncherOutput,
pass signals on, and end with the training's own exit code. No torch here: the launcher stays light.

- The ranks' exit codes come from a file named in ALEXDIST_EXIT_CODES (launcher.record_exit_code): the first
  non-zero one of the last attempt is the run's. torchrun itself says 1 for any failure.
- The child leads a session of its own, so a terminal's Ctrl-C or hang-up reaches this process alone. The first
  SIGTERM, SIGINT or SIGHUP (and every SIGUSR1) writes output_dir/STOP: the ranks checkpoint at the end of their
  step and exit 75, with no deadline (a signal to torchrun stops the workers with one: SIGKILL 30 s later). A
  second one is passed on once, as SIGTERM to the child's process group, which torchrun passes to the workers
  (a stop request too, for a stop that cannot wait). Under Slurm nothing is passed on: `scancel` signals every
  process of the step itself, and a launcher signalled again and again stops waiting for its workers.
- Out of our session the child could outlive us: it asks the kernel for SIGTERM when we die (PR_SET_PDEATHSIG),
  so a SIGKILLed `alexdist launch` still ends in a checkpoint (the launcher stops its workers) and leaves no
  launcher running on alone.
- When this process's stderr is a terminal, the child's is a pseudo-terminal, so the ranks still draw their
  progress bar (they check isatty).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from alexdist.distributed.launch_output import LauncherOutput
from alexdist.distributed.launcher import EXIT_CODES_ENV
from alexdist.distributed.processes import PR_SET_PDEATHSIG
from alexdist.errors import STOPPED_EXIT_CODE

PAUSE_S = 0.1  # a stream quiet this long shows its unfinished line (a progress bar)
DRAIN_S = 30.0  # after the launcher exits, how long a rank it left behind may still hold its stderr


def final_exit_code(recorded: list[int], launcher_code: int, signalled: int | None) -> int:
    """The run's exit code: 0 when the launcher says all went well (torchrun does only when every worker of its
    last round exited 0); else the first non-zero code a rank recorded (the one its line explains); else the
    launcher's, never 0 (128 + N for a signal, as a shell reports it)."""
    if launcher_code == 0:
        return 0
    failed = [c for c in recorded if c != 0]
    if failed:
        return failed[0]
    if signalled:
        return 128 + signalled
    return launcher_code if launcher_code > 0 else 128 - launcher_code


def read_exit_codes(path: Path) -> list[int]:
    """The codes of the last attempt (TorchElastic's restarts), in the order its ranks recorded them (`RANK CODE
    ATTEMPT` lines; anything else is skipped)."""
    rows = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].lstrip("-").isdigit() and parts[2].isdigit():
                rows.append((int(parts[2]), int(parts[1])))
    last = max((attempt for attempt, _ in rows), default=0)
    return [code for attempt, code in rows if attempt == last]


class PassOn:
    """Signal handlers that pass this process's signals on to the launcher's process group (see the module's
    notes); `signalled` is the first one passed on."""

    def __init__(self, pgid: int, stop_file: Path):
        self.pgid, self.stop_file = pgid, stop_file
        self.signalled: int | None = None
        self.passed_on = False  # whether a signal went on to the launcher (at most once)
        self._before: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # under nohup: the run outlives the terminal
            self._before[sig] = signal.signal(sig, self.on_signal)

    def restore(self) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)

    def on_signal(self, signum: int, frame: object = None) -> None:
        if signum == signal.SIGUSR1:
            self._write_stop()
            return
        first = self.signalled is None
        self.signalled = self.signalled or signum
        if first:
            # A stop request by output_dir/STOP, not a signal to the launcher: torchrun would stop its workers
            # with a deadline (SIGKILL 30 s later; Accelerate's one-process launcher 5 s), which a large
            # checkpoint may outlast. Under Slurm every process of the step is signalled by Slurm itself.
            if signum == signal.SIGINT:
                print("alexdist: stopping: the processes save a checkpoint at the end of this step and exit (75); "
                      "the same command resumes (Ctrl-C again to stop them at once)", file=sys.stderr, flush=True)
            if self._write_stop() or "SLURM_STEP_ID" in os.environ:
                return
        elif self.passed_on:
            return  # once: a launcher signalled again and again stops waiting for its workers
        self.passed_on = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGTERM)  # SIGTERM: the ranks take it as a stop request, not SIGINT

    def _write_stop(self) -> bool:
        try:
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.touch()
        except OSError:
            return False
        return True


def supervise(cmd: list[str], stop_file: Path) -> int:
    """Run the launcher command `cmd` to its end; the run's exit code."""
    fd, name = tempfile.mkstemp(prefix="alexdist-exit-codes-")
    os.close(fd)
    codes = Path(name)
    read_end, write_end = _stderr_channel()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=write_end, start_new_session=True,
                                preexec_fn=_dies_with(os.getpid()), env={**os.environ, EXIT_CODES_ENV: str(codes)})
    except BaseException:
        os.close(read_end)
        codes.unlink(missing_ok=True)
        raise
    finally:
        os.close(write_end)
    output = LauncherOutput()
    reader = threading.Thread(target=_show, args=(read_end, output), daemon=True)
    reader.start()
    passing = PassOn(proc.pid, stop_file)
    passing.install()
    try:
        launcher_code = proc.wait()
        reader.join(DRAIN_S)  # still ours: a Ctrl-C while a rank's last lines drain is no traceback
    finally:
        passing.restore()
    recorded = read_exit_codes(codes)
    codes.unlink(missing_ok=True)
    code = final_exit_code(recorded, launcher_code, passing.signalled)
    report = "".join(output.dropped)
    # The launcher's report is shown where no rank said why: none recorded a failure or printed its line (a
    # rank that fails alone prints nothing unless it is rank 0), or a rank was killed by a signal (an OOM kill:
    # its peers then record only that they lost contact). A stop on request (75) needs no report.
    failed = [c for c in recorded if c != 0]
    said = output.explained or (failed and all(c == STOPPED_EXIT_CODE for c in failed))
    if code != 0 and passing.signalled is None and (not failed or not said or "exitcode  : -" in report):
        _write(report)
    return code


def _dies_with(parent: int) -> Callable[[], None] | None:
    """What the child runs between fork and exec: SIGTERM when `parent` dies (Linux; elsewhere nothing). Called
    before any thread of ours starts, as preexec_fn must be."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child should do as little as it can

    def ask() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # we died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return ask


def _stderr_channel() -> tuple[int, int]:
    """(read end, write end) for the launcher's stderr: a pseudo-terminal of our terminal's size when our stderr
    is a terminal, else a pipe."""
    if not sys.stderr.isatty():
        return os.pipe()
    import fcntl
    import termios
    import tty

    read_end, write_end = os.openpty()
    tty.setraw(write_end)  # bytes pass unchanged (no \n -> \r\n): our own terminal does that
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(sys.stderr.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(write_end, termios.TIOCSWINSZ, size)
    return read_end, write_end


def _show(read_end: int, output: LauncherOutput) -> None:
    """Copy the launcher's stderr to ours through `output` until every writer has closed it."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    try:
        while True:
            if not select.select([read_end], [], [], PAUSE_S)[0]:
                _write(output.flush_partial())
                continue
            try:
                data = os.read(read_end, 65536)
            except OSError:  # EIO: a pseudo-terminal whose last writer has gone
                data = b""
            if not data:
                break
            _write(output.feed(decoder.decode(data)))
        _write(output.feed(decoder.decode(b"", final=True)) + output.close())
    finally:
        os.close(read_end)


def _write(text: str) -> None:
    if not text:
        return
    # Our stderr gone (`| head` ended) must not stop the copying: the ranks would block on a full pipe.
    with contextlib.suppress(OSError, ValueError):
        binary = getattr(sys.stderr, "buffer", None)
        if binary is None:  # a replaced sys.stderr (tests)
            sys.stderr.write(text)
        else:
            binary.write(text.encode("utf-8", "surrogateescape"))
        sys.stderr.flush()
