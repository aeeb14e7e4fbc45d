"""The collectives every strategy shares, and what the loop needs to know about process groups.

Each function that communicates is a collective: call it on every rank, in the same order.
"""

from __future__ import annotations

from datetime import timedelta

import torch


def from_main(accelerator, value):
    """Rank 0's `value` (any picklable object) on every rank: one decision about the shared filesystem, made
    once, so that a stale directory listing on another node cannot make the ranks disagree. A collective."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def sum_over_ranks(accelerator, values: torch.Tensor) -> list[float]:
    """Each entry of `values` (floats on the device) summed over the ranks, on the host.

    One all-reduce and one host sync, the same answer on every rank: call it on all ranks, in the same order.
    """
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="sum")
    return values.tolist()


def any_rank(accelerator, flags: torch.Tensor) -> list[bool]:
    """For each entry of `flags` (floats on the device, non-zero = set), whether it is set on any rank (one
    all-reduce and one host sync: see sum_over_ranks)."""
    return [v > 0 for v in sum_over_ranks(accelerator, flags)]


def every_rank(accelerator, values: list[float]) -> list[list[float]]:
    """Every rank's `values` (as many on each rank), one list per rank in rank order, on every rank: one
    all-gather in float64 and one host sync. A collective: for a decision that figures differing between ranks
    (free memory) must not split, each rank decides on all of them."""
    if accelerator.num_processes == 1:
        return [list(values)]
    mine = torch.tensor([values], dtype=torch.float64, device=accelerator.device)
    return accelerator.gather(mine).tolist()


def first_failure(accelerator, error: str | None) -> tuple[int, str] | None:
    """The lowest rank whose `error` is set, with that error, on every rank; None if no rank failed. A collective
    (every rank's error gathered): a rank that failed alone must not leave the others waiting in the next one."""
    if accelerator.num_processes == 1:
        return (0, error) if error else None
    from accelerate.utils import gather_object

    return next(((rank, e) for rank, e in enumerate(gather_object([error])) if e), None)


def plain_module(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without DDP's or torch.compile's wrapper (whose state dict says `_orig_mod.*`)."""
    from alexdist.distributed.accelerator import unwrap

    return unwrap(accelerator, model, keep_torch_compile=False)


def broadcast_buffers(accelerator, model: torch.nn.Module) -> None:
    """Rank 0's floating buffers (BatchNorm's running statistics) on every rank: one broadcast per dtype of all of
    them flattened (a few KB), as DDP coalesces its own buffer broadcast. A collective. Called where the
    statistics are read: before an evaluation and before a checkpoint (in train mode BatchNorm normalises with
    the batch's statistics and only updates the running ones)."""
    if accelerator.num_processes == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in plain_module(accelerator, model).buffers():
        if buf.is_floating_point():
            by_dtype.setdefault(buf.dtype, []).append(buf)
    with torch.no_grad():
        for bufs in by_dtype.values():
            flat = _flatten_dense_tensors(bufs)
            torch.distributed.broadcast(flat, src=0)
            torch._foreach_copy_(bufs, list(_unflatten_dense_tensors(flat, bufs)))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a sharded parameter, gradient or norm), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: call on every rank), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# How gloo and NCCL word a collective that failed because a peer died or hung (lower case). Not just "nccl":
# NCCL's own errors (invalid usage, a CUDA error inside a kernel) are bugs or broken devices, not a lost peer.
_LOST_PEER = ("connection reset", "connection closed", "closed by peer", "pair closure", "broken pipe",
              "timed out", "timeout", "remote process exited", "ncclremoteerror", "network error", "watchdog")


def lost_peer(exc: BaseException) -> bool:
    """Whether an exception is a collective failing because another process died or hung."""
    dist = torch.distributed
    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
        return True  # the rendezvous store or a connection is gone
    if not isinstance(exc, RuntimeError) or not (dist.is_available() and dist.is_initialized()):
        return False
    return any(s in str(exc).lower() for s in _LOST_PEER)


def set_step_timeout(seconds: int) -> None:
    """From now on a collective that waits longer than `seconds` fails, on every process group of the job.

    The groups were created with the longer setup allowance (the default group) or with torch's default (groups
    DeepSpeed makes with `new_group` for ZeRO's data-parallel reductions: 10 minutes on NCCL); training steps,
    evaluations and saves take far less. On NCCL, a peer that died is only noticed this way: the watchdog aborts
    the collective after the timeout (gloo notices a closed connection at once).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # torch < 2.14
    for group in process_groups():
        set_timeout(timedelta(seconds=seconds), group)


def process_groups() -> list:
    """Every process group this process belongs to: the default one and any a library created (DeepSpeed's).
    torch has no public listing; its registry `_world.pg_map` holds them all (torch >= 2.0)."""
    from torch.distributed import distributed_c10d as c10d

    return list(getattr(getattr(c10d, "_world", None), "pg_map", {}) or [c10d._get_default_group()])


def group_timeouts() -> list[float]:
    """Each process group's current timeout in seconds (its backend's options), for tests and the GPU check."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [group._get_backend(device).options._timeout.total_seconds() for group in process_groups()]
