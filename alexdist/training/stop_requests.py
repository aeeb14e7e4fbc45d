"""Stop requests: SIGTERM, SIGUSR1 or a STOP file in output_dir -> checkpoint at the next step and exit 75.
A launcher that dies sends its workers SIGTERM too (processes.die_with_launcher): the same stop.

Every rank handles the signals itself (Slurm's `scancel` signals every process of a job). Launchers do not
all forward signals: `torchrun` / `accelerate launch` do not pass SIGUSR1 on to their workers (pytorch #154849),
so where only the launcher or a batch shell can be signalled, it writes `output_dir/STOP` instead; that is what
`slurm/train.sh` does; rank 0 alone looks for the file. At every optimizer-step boundary the ranks agree with one
all-reduce: if any rank was asked, all stop together, so no rank waits forever in a collective for one that
left.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch

from alexdist.distributed.collectives import any_rank

STOP_FILE = "STOP"
# "Stopped on request, resumable" (EX_TEMPFAIL): the run saved a checkpoint and `resume: auto` continues it.
STOPPED_EXIT_CODE = 75


class StopRequests:
    def __init__(self, accelerator, output_dir: str | Path):
        self.acc = accelerator
        self.stop_file = Path(output_dir) / STOP_FILE
        self.reason: str | None = None
        self._parent = os.getppid()
        # [asked to stop, bad step]: allocated once, filled in place each step (no host-to-device copy).
        self._flags = torch.zeros(2, device=accelerator.device)
        if accelerator.is_main_process:
            # A STOP file left by the request that stopped the previous attempt must not stop this one.
            self.stop_file.unlink(missing_ok=True)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the loop acts at the next step boundary. A repeated signal changes nothing (under Slurm,
        # `scancel` signals the workers and torchrun forwards its own SIGTERM too); what follows a graceful stop
        # that takes too long is the launcher's or Slurm's SIGKILL.
        self.reason = self.reason or signal.Signals(signum).name

    def agree(self, bad_step: torch.Tensor | bool = False) -> tuple[bool, bool]:
        """(stop, bad): whether any rank has been asked to stop, and whether any rank flagged this step as bad
        (NaN/inf, see guard.py; a device tensor, so nothing syncs before the all-reduce). One all-reduce and
        one host sync for both, the same answer on every rank: call it on all ranks."""
        # Rank 0 alone looks for the file (a stale listing on another node must not stop that node alone, nor
        # a STOP removed after a requeue stop the new attempt); the all-reduce tells the others.
        if self.reason is None and self.acc.is_main_process and self.stop_file.exists():
            self.reason = f"{STOP_FILE} file"
        if self.reason == "SIGTERM" and os.getppid() != self._parent:  # reparented: processes.die_with_launcher
            self.reason = "the launcher died (SIGTERM)"
        self._flags[0].fill_(1.0 if self.reason else 0.0)
        self._flags[1].copy_(torch.as_tensor(bad_step))
        stop, bad = any_rank(self.acc, self._flags)
        if stop and self.reason is None:
            self.reason = "another rank was asked"
        return stop, bad
