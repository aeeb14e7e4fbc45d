"""Stop requests: SIGTERM, SIGUSR1, SIGHUP or a STOP file in output_dir -> checkpoint at the next step and exit
75. SIGHUP (the terminal closed, or a launcher passing on its own hang-up) only where it is not ignored at start:
a run under `nohup` outlives the terminal. A launcher that dies sends its workers a signal of their own
(processes.LAUNCHER_DEATH_SIGNAL, see die_with_launcher): the same stop, reported as "the launcher died".

Every rank handles the signals itself (Slurm's `scancel` signals every process of a job). Launchers do not
all forward signals: `torchrun` / `accelerate launch` do not pass SIGUSR1 on to their workers (pytorch #154849),
so where only the launcher or a batch shell can be signalled, it writes `output_dir/STOP` instead; that is what
`slurm/train.sh` does; rank 0 alone looks for the file. At every optimizer-step boundary the ranks agree with one
all-reduce: if any rank was asked, all stop together, so no rank waits forever in a collective for one that
left.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from alexdist.distributed.collectives import sum_over_ranks
from alexdist.distributed.processes import LAUNCHER_DEATH_SIGNAL, LAUNCHER_DEATH_SIGNAL_NAME, launcher_death_armed

STOP_FILE = "STOP"
MEASURES = 2  # device floats a step can have summed over ranks in its agreement (the noise scale's two norms)


class StopRequests:
    def __init__(self, accelerator, output_dir: str | Path):
        self.accelerator = accelerator
        self.stop_file = Path(output_dir) / STOP_FILE
        self.reason: str | None = None
        # [asked to stop, bad step, then the step's measures]: allocated once, filled in place each step (no
        # host-to-device copy).
        self._flags = torch.zeros(2 + MEASURES, device=accelerator.device)
        if accelerator.is_main_process:
            # A STOP file left by the request that stopped the previous attempt must not stop this one.
            self.stop_file.unlink(missing_ok=True)
        if threading.current_thread() is threading.main_thread():
            for sig in stop_signals():
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the loop acts at the next step boundary. A repeated signal changes nothing (under Slurm,
        # `scancel` signals the workers and torchrun forwards its own SIGTERM too); what follows a graceful stop
        # that takes too long is the launcher's or Slurm's SIGKILL.
        self.reason = self.reason or signal_reason(signum)

    def agree(self, bad_step: torch.Tensor | bool = False,
              measures: torch.Tensor | None = None) -> tuple[bool, bool, list[float]]:
        """(stop, bad, measures): whether any rank has been asked to stop, whether any rank flagged this step as
        bad (NaN/inf, see divergence.py; a device tensor, so nothing syncs before the all-reduce), and `measures`
        (up to MEASURES device floats, e.g. the noise scale's squared norms) summed over ranks. One all-reduce
        and one host sync for all of it, the same answer on every rank: call it on all ranks."""
        # Rank 0 alone looks for the file (a stale listing on another node must not stop that node alone, nor
        # a STOP removed after a requeue stop the new attempt); the all-reduce tells the others.
        if self.reason is None and self.accelerator.is_main_process and self.stop_file.exists():
            self.reason = f"{STOP_FILE} file"
        self._flags[0].fill_(1.0 if self.reason else 0.0)
        self._flags[1].copy_(torch.as_tensor(bad_step))
        if measures is not None:
            self._flags[2:2 + len(measures)].copy_(measures)
        stop, bad, *summed = sum_over_ranks(self.accelerator, self._flags)
        if stop > 0 and self.reason is None:
            self.reason = "another rank was asked"
        return stop > 0, bad > 0, summed


def stop_signals() -> list[int]:
    """The signals this process takes as a stop request. An ignored SIGHUP stays ignored: `nohup` set it so that
    the run outlives the terminal (under a launcher that leaves it alone, the workers inherit it)."""
    signals = [signal.SIGTERM, signal.SIGUSR1]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    if launcher_death_armed():
        signals.append(LAUNCHER_DEATH_SIGNAL)
    return signals


def signal_reason(signum: int) -> str:
    """What a stop signal means: its name, or that the launcher died (the launcher-death signal says so by itself:
    the kernel sends it when the launcher goes, whatever the parent pid reads at that moment), or that the
    terminal closed (SIGHUP, which torchrun also passes on to its workers when it gets one)."""
    if signum == LAUNCHER_DEATH_SIGNAL:
        return f"the launcher died ({LAUNCHER_DEATH_SIGNAL_NAME})"
    name = signal.Signals(signum).name
    return f"the terminal closed ({name})" if signum == signal.SIGHUP else name
