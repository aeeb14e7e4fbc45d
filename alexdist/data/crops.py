"""Crop geometry of the streamed path, as pure functions: the random draws of an epoch position, the training crop
box they give (ImageNet's RandomResizedCrop) and the evaluation's centre box.

The draws are a function of (seed, epoch, position in the epoch) only, like the in-memory path's
(batches.epoch_augment_params), so a sample is cropped the same way whatever the number of processes, loader
workers or the accumulation. They are computed a block of positions at a time, so no epoch-sized array is ever
made and any subset of positions, in any order, gets the same rows.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

BLOCK = 4096  # positions drawn together from one generator
_STREAM = 0x5243  # keeps these draws apart from any other stream seeded from (seed, epoch)


@lru_cache(maxsize=4)
def _block(seed: int, epoch: int, block: int) -> np.ndarray:
    """(BLOCK, 5) uniforms in [0, 1) of one block of epoch positions (cached: a batch's positions are adjacent)."""
    key = np.random.SeedSequence([seed & (2**64 - 1), epoch, block, _STREAM])  # SeedSequence wants ints >= 0
    rows = np.random.Generator(np.random.PCG64(key)).random((BLOCK, 5))
    rows.flags.writeable = False  # shared by every caller through the cache
    return rows


def rrc_params(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """float64 (len(positions), 5): four uniforms in [0, 1) (area share, log-aspect, left, top; see rrc_box) and
    a flip bit (0. or 1.), one row per epoch position."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    out = np.empty((len(positions), 5))
    blocks = positions // BLOCK
    for b in np.unique(blocks):
        sel = blocks == b
        out[sel] = _block(seed, epoch, int(b))[positions[sel] - int(b) * BLOCK]
    out[:, 4] = out[:, 4] < 0.5
    return out


def rrc_box(params_row: np.ndarray, width: int, height: int, scale: tuple[float, float],
            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, w, h) of the training crop of a width x height image, drawn as torchvision's RandomResizedCrop
    draws it: area share uniform in `scale`, log of the aspect w/h uniform in log(`ratio`), a box that does not fit
    the image drawn again (up to 10 tries, then torchvision's centre-crop fallback), position uniform.

    The first try uses the row's own two uniforms; the rare further tries draw from a generator seeded from them,
    so the box stays a function of the row alone. Clamping a box that does not fit to the image instead (no
    further tries) would keep the large areas torchvision redraws: on a 4:3 image at the default ranges the mean
    area share would be 0.52 instead of torchvision's 0.43.
    """
    u_area, u_aspect, u_left, u_top = (float(v) for v in params_row[:4])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    retries = None
    for _ in range(10):
        target = width * height * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u_aspect * (log_hi - log_lo))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = min(int(u_left * (width - w + 1)), width - w)
            top = min(int(u_top * (height - h + 1)), height - h)
            return left, top, w, h
        if retries is None:
            retries = np.random.default_rng([int(u_area * 2**53), int(u_aspect * 2**53)])
        u_area, u_aspect = retries.random(2)
    w, h = width, height  # torchvision's fallback: the centre crop at the nearest allowed aspect
    if width / height < min(ratio):
        h = round(width / min(ratio))
    elif width / height > max(ratio):
        w = round(height * max(ratio))
    return (width - w) // 2, (height - h) // 2, w, h


def eval_resize_of(image_size: int, eval_resize: int | None, random_resized_crop: bool) -> int | None:
    """The shorter side evaluation resizes to before its centre crop: data.eval_resize, else torchvision's 256/224
    of the image size with ImageNet's training crop; None: a plain resize to image_size x image_size."""
    if eval_resize is None and random_resized_crop:
        return round(image_size * 256 / 224)
    return eval_resize


def centre_box(width: int, height: int, eval_resize: int, size: int) -> tuple[float, float, float, float]:
    """(left, top, w, h), in the image's own pixels (fractional), of what torchvision's Resize(eval_resize) +
    CenterCrop(size) keep: the shorter side resized to eval_resize, the longer one to its whole pixels, the crop's
    offset rounded to whole pixels of the resized image (half a pixel matters at 32 px). Resizing this box
    straight to size x size is one resampling of only the pixels kept.

    An eval_resize below size (torchvision would pad with black) keeps the centre square of the shorter side.
    """
    if eval_resize < size:
        side = min(width, height)
        return (width - side) / 2, (height - side) / 2, side, side
    short, long = sorted((width, height))
    new_long = int(eval_resize * long / short)
    rw, rh = (eval_resize, new_long) if width <= height else (new_long, eval_resize)
    sx, sy = width / rw, height / rh
    return round((rw - size) / 2) * sx, round((rh - size) / 2) * sy, size * sx, size * sy
