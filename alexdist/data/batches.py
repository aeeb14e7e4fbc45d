"""Batches from an in-memory uint8 dataset, augmented as batched tensor ops on the training device.

The order and the augmentation parameters are order.py's pure functions of (seed, epoch, position), shared with
the streamed path (streamed.py). Random crops (zero padding) and flips are drawn per epoch position.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import InitVar, dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from alexdist.config import AugmentConfig
from alexdist.data.order import StepLayout, epoch_augment_params, epoch_permutation, eval_shard

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


Stats = tuple[float, float, float]


@lru_cache(maxsize=8)
def _norm_constants(device: torch.device, mean: Stats, std: Stats) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift of the normalisation, copied to `device` once (a host-to-device copy per batch would
    be a host sync on CUDA)."""
    scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], device=device).view(1, 3, 1, 1)
    return scale, shift


def normalize(x: torch.Tensor, input_size: int, mean: Stats = CIFAR_MEAN, std: Stats = CIFAR_STD) -> torch.Tensor:
    """uint8 (B,3,S,S) -> normalised float, upsampled (bilinear) when the model wants larger inputs."""
    scale, shift = _norm_constants(x.device, tuple(mean), tuple(std))
    out = x.float().mul_(scale).sub_(shift)  # (x/255 - mean)/std with one temporary
    if input_size != out.shape[-1]:
        out = F.interpolate(out, size=input_size, mode="bilinear", align_corners=False)
    return out


def augment(x: torch.Tensor, params: torch.Tensor, padding: int) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip of a uint8 batch, as one gather on x's device.

    The reference definition; TrainBatches computes the same with one indexing copy of precomputed views.

    Each output pixel's source in the zero-padded image is computed from the sample's offsets (dy, dx) and flip
    bit; one `gather` then does crop and flip together.
    """
    b, c, h, w = x.shape
    pad_h, pad_w = h + 2 * padding, w + 2 * padding
    padded = (F.pad(x, (padding,) * 4) if padding else x).reshape(b, -1)
    params = params.to(x.device)
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1) * (pad_h * pad_w)
    dy, dx = params[:, 0].view(b, 1, 1, 1), params[:, 1].view(b, 1, 1, 1)
    flip = params[:, 2].view(b, 1, 1, 1).bool()
    src_cols = torch.where(flip, (w - 1) - cols, cols) + dx
    index = (chan + (rows + dy) * pad_w + src_cols).reshape(b, -1)
    return padded.gather(1, index).reshape(b, c, h, w)


def source_bytes(n: int, size: int, padding: int, flip: bool) -> int:
    """What TrainBatches keeps for `n` uint8 images of `size` px: the zero-padded images, and their mirror images
    when flips are on (CIFAR-10 at 32 px, padding 4: 481 MB; at 224 px: 16 GB)."""
    return (2 if flip else 1) * n * 3 * (size + 2 * padding) ** 2


@dataclass
class TrainBatches(StepLayout):
    """This rank's micro-batches, grouped by optimizer step, built on `device` (default: where `x` is)."""

    x: InitVar[torch.Tensor]  # uint8 (N, 3, S, S), anywhere: copied once into the padded source, not kept
    y: torch.Tensor
    batch_size: int
    grad_accum: int
    rank: int
    world: int
    seed: int
    augment_cfg: AugmentConfig
    input_size: int
    device: torch.device | None = None
    mean: Stats = CIFAR_MEAN
    std: Stats = CIFAR_STD

    def __post_init__(self, x: torch.Tensor) -> None:
        # Every crop of every image, plain and mirrored, as one strided view of the zero-padded dataset and its
        # mirror image: a batch is then a single indexing copy (select + crop + flip at once; faster than a
        # gather with a computed index, see DEVELOPERS.md). The padded copies are all it keeps (source_bytes),
        # filled a chunk at a time, so building them never holds the images twice on the device.
        p, flip = self.augment_cfg.crop_padding, self.augment_cfg.flip
        device = self.device or x.device
        n, c, h, w = x.shape
        self._source = torch.zeros((2 if flip else 1, n, c, h + 2 * p, w + 2 * p), dtype=x.dtype, device=device)
        for i in range(0, n, 1024):
            part = x[i:i + 1024].to(device)
            self._source[0, i:i + len(part), :, p:p + h, p:p + w] = part
            if flip:  # the mirror of the zero-padded image is the zero-padded mirror image
                self._source[1, i:i + len(part), :, p:p + h, p:p + w] = part.flip(-1)
        self.y = self.y.to(device)
        copies, n, c, ph, pw = self._source.shape
        k, st = 2 * p + 1, self._source.stride()
        self._crops = self._source.as_strided((copies, n, k, k, c, ph - 2 * p, pw - 2 * p),
                                              (st[0], st[1], pw, 1, ph * pw, pw, 1))

    def _augmented(self, idx: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Images `idx`, cropped at (dy, dx) and flipped where the flip bit is set: equal to augment(x[idx], ...)."""
        dy, dx, flip = params[:, 0], params[:, 1], params[:, 2]
        # In the mirror image, the crop at dx of the original sits at 2 * padding - dx.
        dx = torch.where(flip.bool(), 2 * self.augment_cfg.crop_padding - dx, dx)
        return self._crops[flip, idx, dy, dx]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.y) // self.effective_batch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Yield, per optimizer step from `start_step`, the list of `grad_accum` (inputs, labels) micro-batches."""
        n = len(self.y)
        dev = self._source.device  # one small host-to-device copy per epoch, none per step
        perm = epoch_permutation(n, self.seed, epoch).to(dev)
        aug = epoch_augment_params(n, self.seed, epoch, self.augment_cfg.crop_padding, self.augment_cfg.flip).to(dev)
        for step in range(start_step, self.steps_per_epoch):
            micro = []
            for j in range(self.grad_accum):
                pos = self.positions(step, j)
                idx = perm[pos]
                xb = self._augmented(idx, aug[pos])
                micro.append((normalize(xb, self.input_size, self.mean, self.std), self.y[idx]))
            yield micro


@dataclass
class MemoryEvalSet:
    """An evaluation split held in memory (uint8 images where they were placed), handed out per rank in batches:
    contiguous, disjoint shards that together are every image exactly once."""

    x: torch.Tensor
    y: torch.Tensor
    input_size: int
    mean: Stats = CIFAR_MEAN
    std: Stats = CIFAR_STD

    def __len__(self) -> int:
        return len(self.y)

    def n_batches(self, rank: int, world: int, batch_size: int) -> int:
        return -(-len(eval_shard(len(self.y), rank, world)) // batch_size)

    def batches(self, rank: int, world: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = eval_shard(len(self.y), rank, world).to(self.x.device)
        for chunk in idx.split(batch_size):
            yield normalize(self.x[chunk], self.input_size, self.mean, self.std), self.y[chunk]


def to_device(t: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch built on the host (speed.data_on_device=false) to the device: from pinned memory, not blocking, so
    the copy overlaps the previous step's kernels. A no-op for batches already on the device."""
    if t.device != device:
        if device.type == "cuda":
            t = t.pin_memory()
        t = t.to(device, non_blocking=True)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t
