"""Loss and accuracy during training: per-step sums kept on the device, and the distributed test evaluation.

Nothing here syncs the host with the device except the one reduce at the end of an evaluation (and wherever a
caller asks for a number): sums are device tensors, counts are built with fills, never copied from the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alexdist.data.batches import to_device
from alexdist.data.interface import EvalSet
from alexdist.distributed.collectives import plain_module
from alexdist.models import NUM_CLASSES
from alexdist.training.precision import loss_input

# Top-5 accuracy is reported beside top-1 above this many classes (ImageNet's convention; at 10 classes it says
# little: 5 guesses of 10).
TOP5_ABOVE = 10


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


@dataclass
class Evaluation:
    """One pass over the test set: loss and accuracy, the confusion matrix (rows: true class, columns: predicted),
    and the same loss and accuracy with test-time augmentation (None without)."""

    loss: float
    acc: float
    confusion: list[list[int]]
    tta_loss: float | None = None
    tta_acc: float | None = None
    acc5: float | None = None  # top-5 accuracy, with more than TOP5_ABOVE classes

    def per_class_acc(self) -> list[float]:
        return [row[i] / max(1, sum(row)) for i, row in enumerate(self.confusion)]


def tta_logits(net, x: torch.Tensor, mode: str) -> torch.Tensor:
    """airbench's test-time augmentation: logits averaged over the image and its mirror (`flip`), and for
    `flip_translate` also over both of them shifted one pixel up-left and down-right (reflect padding), the
    shifted pair weighing as much as the unshifted one."""
    def mirror(t: torch.Tensor) -> torch.Tensor:
        return 0.5 * (loss_input(net(t)) + loss_input(net(t.flip(-1))))

    logits = mirror(x)
    if mode == "flip_translate":
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = 0.5 * (mirror(padded[..., :h, :w]) + mirror(padded[..., 2:h + 2, 2:w + 2]))
        logits = 0.5 * logits + 0.5 * shifted
    return logits


@torch.no_grad()
def evaluate_ranks(accelerator, model, data: EvalSet, batch_size: int, in_dtype: torch.dtype,
                   sharded: bool = False, channels_last: bool = False, tta: str = "none",
                   num_classes: int = NUM_CLASSES) -> Evaluation:
    """Every image of `data` exactly once, summed across ranks (`accelerator=None`: this one process does it all).

    Batches are built one at a time (the 227 px model's whole upsampled test set would take ~6 GB at once).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(iter(model.parameters()), torch.zeros(0)).device
    # DDP's forward would broadcast buffers (a collective) while ranks may hold different numbers of test
    # batches, so the unwrapped module runs (Accelerate's autocast wrapper is kept). ZeRO-3 and FSDP gather
    # parameters in every forward, a collective too: there every rank runs the same number of forwards.
    net = model if sharded or accelerator is None else plain_module(accelerator, model)
    was_training = net.training
    net.eval()
    k, top5 = num_classes, num_classes > TOP5_ABOVE
    # loss, correct, n, tta loss, tta correct, top-5 correct, then the confusion matrix: one reduce, exact counts
    sums = torch.zeros(6 + k * k, dtype=torch.float64, device=device)
    n_own = data.n_batches(rank, world, batch_size)
    n_forward = data.n_batches(0, world, batch_size) if sharded else n_own
    batches = data.batches(rank, world, batch_size)
    xb = yb = None
    for i in range(n_forward):
        if i < n_own:
            xb, yb = next(batches)
            xb, yb = to_device(xb, device, channels_last), to_device(yb, device)
        inputs = xb.to(in_dtype)
        out = loss_input(net(inputs))
        aug = tta_logits(net, inputs, tta) if tta != "none" else None
        if i < n_own:  # extra forwards only keep the sharded strategies' collectives in step
            sums[:3] += batch_stats(F.cross_entropy(out, yb, reduction="sum"), out, yb)
            if aug is not None:
                sums[3:5] += batch_stats(F.cross_entropy(aug, yb, reduction="sum"), aug, yb)[:2]
            if top5:
                sums[5] += (out.topk(5, 1).indices == yb[:, None]).any(1).sum()
            # index_add_, not bincount: bincount sizes its output from the data, a host sync per batch on CUDA.
            cells = (yb * k + out.argmax(1)).long()
            sums[6:].index_add_(0, cells, torch.ones_like(cells, dtype=sums.dtype))
    net.train(was_training)
    if world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    v = sums.tolist()
    n = v[2]
    cm = [[int(c) for c in v[6 + r * k:6 + (r + 1) * k]] for r in range(k)]
    tta_loss, tta_acc = (v[3] / n, v[4] / n) if tta != "none" else (None, None)
    return Evaluation(v[0] / n, v[1] / n, cm, tta_loss, tta_acc, v[5] / n if top5 else None)
