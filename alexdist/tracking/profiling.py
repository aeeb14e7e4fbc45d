"""tracking.profile_steps: a torch.profiler trace of chosen optimizer steps on rank 0, and peak memory per rank.

The trace is Chrome's trace-event JSON (open it in chrome://tracing or https://ui.perfetto.dev), named
`*.pt.trace.json` so TensorBoard's profiler plugin finds it too: output_dir/profile/rank0.steps-S-E.pt.trace.json.
Only rank 0 profiles: the others run the same steps, and a profiler on every rank would slow the whole job.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch


class StepProfiler:
    """Starts before optimizer step `start` and writes the trace after step `end` (1-based, inclusive)."""

    def __init__(self, steps: list[int] | None, output_dir: str, enabled: bool):
        self.start, self.end = steps if steps and enabled else (0, -1)
        self.out = Path(output_dir) / "profile" / f"rank0.steps-{self.start}-{self.end}.pt.trace.json"
        self._prof = None

    def before_step(self, step: int) -> None:
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities, profile_memory=True, record_shapes=True)
            self._prof.__enter__()

    def after_step(self, step: int) -> None:
        if self._prof is not None and step == self.end:
            self._prof.__exit__(None, None, None)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._prof.export_chrome_trace(str(self.out))
            self._prof = None


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory: CUDA's peak allocation on a GPU, the peak resident set size on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
