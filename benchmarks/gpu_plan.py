"""The GPU check's plan: its rows as data. Each row names what runs it (a training run through a launcher, or a
probe in a process of its own) and what it must show; gpu_check.py runs them in order and reports.

Rows run most important first: a call that runs out of time loses the last ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gpu_check_imagenet import imagenet_row
from gpu_probes import (
    bare_loop,
    ceiling,
    probe_collectives,
    probe_lars_fsdp,
    probe_overflow,
    probe_overflow_first,
    probe_sync_bn,
    probe_syncs,
    probe_universal,
)
from gpu_runners import child, headline, train

ZERO2 = "recipes/accelerate/zero2.yaml"


@dataclass
class Setting:
    """The sizes a check runs at: the real ones on a GPU, tiny ones for the CPU dry run."""

    device: str
    batch: int
    width: float
    steps: int  # optimizer steps per epoch (two epochs are run)
    precisions: list[str]
    epoch_images: int  # the headline epoch
    test_images: int

    @property
    def half(self) -> str:
        """The fastest precision: bf16 on a GPU, fp32 (`no`) on the CPU dry run."""
        return "bf16" if self.device == "cuda" else "no"


GPU = Setting("cuda", 128, 1.0, 120, ["no", "bf16", "fp16"], 50_000, 10_000)
CPU = Setting("cpu", 16, 0.25, 6, ["no"], 512, 128)


@dataclass
class Row:
    """One row: `run` is how (gpu_runners.train, .headline, or gpu_runners.child(probe)); `expect` turns the
    result into pass/fail checks where the row must show something rather than measure it."""

    name: str
    run: Callable
    precision: str = "no"
    options: list[str] = field(default_factory=list)
    launcher: str = "accelerate1"  # accelerate1 | torchrun (a real process group of one) | python
    config_file: str | None = None
    needs_cuda: bool = False
    needs_deepspeed: bool = False
    env: dict[str, str] = field(default_factory=dict)
    expect_exit: int = 0
    expect: Callable[[dict], dict] | None = None


def _nan_stops_at_step_3(r: dict) -> dict:
    """The NaN row: steps 3, 4 and 5 skipped, then the divergence stop (exit 6) with its one line."""
    return {"bad steps 3-5 skipped": r.get("bad_steps") == [3, 4, 5],
            "one-line divergence stop": "training diverged" in r.get("message", "")}


def plan(s: Setting) -> list[Row]:
    half, cuda = s.half, s.device == "cuda"
    fast = ["speed.channels_last=true", "speed.compile=true"] if cuda else ["speed.channels_last=true"]
    fsdp, zero2 = ["distributed.strategy=fsdp"], ["distributed.strategy=deepspeed"]
    rows = [
        Row("ceiling: matmul throughput of this device", child(ceiling), half),
        Row(f"bare loop {half}", child(bare_loop), half), Row(f"alexdist {half}", train, half),
        Row("headline: one CIFAR-sized epoch, fastest setting", headline, half, fast),
        # Host syncs per optimizer step and per evaluation, each strategy in a real process group of one.
        Row("host syncs, DDP", child(probe_syncs), half, ["distributed.strategy=ddp"], launcher="torchrun"),
        Row("host syncs, FSDP2", child(probe_syncs), half, fsdp, launcher="torchrun"),
        Row("host syncs, ZeRO-2", child(probe_syncs), half, zero2, launcher="torchrun", needs_deepspeed=True),
        # Collectives per optimizer step, counted by the profiler on 2 processes (NCCL on GPUs).
        Row("collectives per step, ZeRO-2 (no buffer broadcasts)", child(probe_collectives, nproc=2), half,
            zero2 + ["train.grad_accum=2"], launcher="torchrun", needs_deepspeed=True),
        Row("LARS under FSDP2: all-reduces per step", child(probe_lars_fsdp, nproc=2), half, fsdp,
            launcher="torchrun"),
        Row("SyncBatchNorm vs DDP, same global batch", child(probe_sync_bn, nproc=2), half, launcher="torchrun",
            needs_cuda=True),
        Row("fp16 overflow at step 1: skipped, momentum zero, then trains", child(probe_overflow_first), "fp16",
            needs_cuda=True),
        Row("fp16 overflow after a step: skipped, scale lowered", child(probe_overflow), "fp16", needs_cuda=True),
        Row("NaN loss from step 3: skipped, then exit 6", train, "fp16" if cuda else "no",
            ["train.max_bad_steps=3"], launcher="python", env={"ALEXDIST_FAULT": "nan:3-"}, expect_exit=6,
            expect=_nan_stops_at_step_3),
        Row("ZeRO-2 AdamW: 2 CPU ranks -> 1 device, universal checkpoint", child(probe_universal), half,
            launcher="torchrun", needs_deepspeed=True),
        Row("ZeRO-2 fp16", train, "fp16", config_file=ZERO2, needs_cuda=True, needs_deepspeed=True),
        Row(f"ZeRO-2 {half}", train, half, config_file=ZERO2, needs_deepspeed=True),
        # `accelerate launch --num_processes 1` gives Accelerate's non-distributed mode and `--multi_gpu` wants 2
        # processes: torchrun with one process forms a real group (NCCL on a GPU) and DDP wraps the model.
        Row(f"DDP, real process group, {half}", train, half, launcher="torchrun"),
        Row(f"FSDP2 {half}, real process group", train, half, fsdp, launcher="torchrun"),
        Row(f"FSDP2 {half} channels_last (contiguous parameters)", train, half, fsdp + ["speed.channels_last=true"],
            launcher="torchrun"),
        # ImageNet-size: does the loader or the model bound a step? (gpu_check_imagenet.py)
        Row("ImageNet-size 224 px: img/s per GPU streamed from disk vs from memory", imagenet_row, half),
    ]
    for p in s.precisions:
        if p != half:
            rows += [Row(f"bare loop {p}", child(bare_loop), p), Row(f"alexdist {p}", train, p)]
    return rows + [Row(f"alexdist {half} channels_last", train, half, ["speed.channels_last=true"]),
                   Row(f"alexdist {half} compile", train, half, ["speed.compile=true"], needs_cuda=not cuda),
                   Row(f"alexdist {half} channels_last+compile", train, half, fast, needs_cuda=not cuda)]
