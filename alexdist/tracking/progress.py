"""Progress on the main process: a tqdm bar in a terminal; elsewhere (Slurm logs, nohup, CI) one line every
`train.log_every` optimizer steps, as the HF Trainer logs, so a log file shows how a run is doing."""

from __future__ import annotations

import datetime
import sys
import time

from tqdm.auto import tqdm


class Progress:
    def __init__(self, main: bool, total_steps: int, effective_batch: int, start_step: int):
        self.main, self.total, self.batch = main, total_steps, effective_batch
        self.terminal = sys.stderr.isatty()
        self._bar = None
        self._last = (time.time(), start_step)  # (time, step) of the previous line

    def start_epoch(self, epoch: int, steps: int, done: int) -> None:
        if self.main and self.terminal:
            self._bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)

    def step(self, step: int, loss: float | None, lr: float) -> None:
        """After each optimizer step; `loss` is given on log steps only (reading it is a host sync)."""
        if not self.main:
            return
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.3f}")
            return
        if loss is None or self.terminal:
            return
        now, (t0, s0) = time.time(), self._last
        per_step = max(now - t0, 1e-9) / max(1, step - s0)
        eta = datetime.timedelta(seconds=round(per_step * (self.total - step)))
        print(f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.4g} | {self.batch / per_step:,.0f} img/s | "
              f"ETA {eta}", flush=True)
        self._last = (now, step)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
