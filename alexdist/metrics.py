"""Loss and accuracy during training: per-step sums kept on the device, and the distributed test evaluation.

Nothing here syncs the host with the device except the one reduce at the end of an evaluation (and wherever a
caller asks for a number): sums are device tensors, counts are built with fills, never copied from the host.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alexdist.batches import eval_batches, eval_shard, to_device
from alexdist.distributed import plain_module
from alexdist.precision import loss_input


def batch_stats(loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed loss, correct, count] as float64 on the device (no host sync: the count is a fill, not a copy)."""
    correct = (logits.argmax(1) == labels).sum().double()
    return torch.stack([loss_sum.double(), correct, torch.full_like(correct, len(labels))])


class EpochMeter:
    """This epoch's running [summed loss, correct, count] over this rank's good steps, on the device.

    A run resumed mid-epoch starts from the global sums saved so far, added on rank 0 only, so that the reduce
    over ranks counts them once.
    """

    def __init__(self, device: torch.device, start: list[float] | None = None, main: bool = True):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        if start and main:
            self.sums += torch.tensor(start, dtype=torch.float64).to(device)

    def add(self, step_sums: torch.Tensor) -> None:
        self.sums += step_sums

    def total(self, accelerator) -> list[float]:
        """The global [summed loss, correct, count] (a collective, and a host sync)."""
        return accelerator.reduce(self.sums, reduction="sum").tolist()


def agree_buffers(accelerator, model: torch.nn.Module, deepspeed: bool) -> None:
    """Make every rank's BatchNorm statistics the same before evaluating.

    DDP broadcasts rank 0's buffers at the start of each forward, then every rank updates them with its own
    batch: after a step the ranks differ, and the checkpoint holds rank 0's. Broadcasting rank 0's changes no
    training (the next forward would broadcast them anyway) and makes every rank evaluate the saved model.
    ZeRO broadcasts nothing: there the ranks' statistics are averaged (and the average is what is saved).
    """
    if accelerator.num_processes == 1:
        return
    buffers = [b for b in plain_module(accelerator, model).buffers() if b.is_floating_point()]
    with torch.no_grad():
        for buf in buffers:
            if deepspeed:
                buf.copy_(accelerator.reduce(buf.detach().clone(), reduction="mean"))
            else:
                torch.distributed.broadcast(buf, src=0)


@torch.no_grad()
def evaluate_ranks(accelerator, model, x, y, batch_size: int, input_size: int, in_dtype: torch.dtype, zero3: bool,
                   channels_last: bool = False) -> tuple[float, float]:
    """Test loss and accuracy over every test image exactly once, summed across ranks.

    Batches are built one at a time (the 227 px model's whole upsampled test set would take ~6 GB at once).
    """
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    # DDP's forward would broadcast buffers (a collective) while ranks may hold different numbers of test
    # batches, so the unwrapped module runs (Accelerate's autocast wrapper is kept). ZeRO-3 gathers
    # parameters in every forward, a collective too: there every rank runs the same number of forwards.
    net = model if zero3 else plain_module(accelerator, model)
    was_training = net.training
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    n_own = math.ceil(len(eval_shard(len(y), rank, world)) / batch_size)
    n_forward = math.ceil(len(eval_shard(len(y), 0, world)) / batch_size) if zero3 else n_own
    batches = eval_batches(x, y, rank, world, batch_size, input_size)
    xb = yb = None
    for i in range(n_forward):
        if i < n_own:
            xb, yb = next(batches)
            xb, yb = to_device(xb, device, channels_last), to_device(yb, device)
        out = loss_input(net(xb.to(in_dtype)))
        if i < n_own:  # extra forwards only keep ZeRO-3's collectives in step
            sums += batch_stats(F.cross_entropy(out, yb, reduction="sum"), out, yb)
    net.train(was_training)
    loss, correct, count = accelerator.reduce(sums, reduction="sum").tolist()
    return loss / count, correct / count
