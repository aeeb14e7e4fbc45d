"""Encoded image bytes -> the uint8 (3, S, S) tensors of the streamed path: training crops and evaluation crops,
pure functions of the bytes and the position's draws (run in loader workers; normalization stays on the device).

Two kinds of training crop:
- augment.random_resized_crop (ImageNet): the box from crops.rrc_box, decoded at a reduced size where the box
  allows, resized to S x S, flipped. The reduced decode is Pillow's draft (libjpeg-turbo's DCT scaling): 20 %
  less time at 1/2 than a full decode, 30 % at 1/8, and a smaller image to resize.
- else the in-memory path's own: the whole image at S x S (dataset.image_tensor, the same resampling), then the
  zero-padded crop and flip of batches.augment with its int params (dy, dx, flip), byte for byte.
Evaluation: torchvision's Resize + CenterCrop as one box (crops.centre_box), reduced decode as above; or, with no
data.eval_resize, the in-memory path's whole image at S x S.

The resized crops (random_resized_crop, eval_resize) keep the decoder's pixel order in memory (channels last:
strides (1, 3S, 3)) in a (3, S, S) view: a channels-last batch (torch.channels_last) takes them with a plain
copy, where making each contiguous first would cost a transposing copy (0.1 ms an image at 224 px).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from alexdist.config import AugmentConfig
from alexdist.data.crops import centre_box, rrc_box
from alexdist.data.dataset import image_tensor
from alexdist.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

_REDUCTIONS = (8, 4, 2)  # the scales libjpeg can decode at (besides 1)
_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR (Pillow imported in the workers only)
Box = tuple[float, float, float, float]
BoxOf = Callable[[int, int], Box]  # (width, height) of the image -> its crop box (left, top, w, h)


def decode_train(data: bytes, params: np.ndarray, size: int, aug: AugmentConfig, *,
                 name: str = "image") -> torch.Tensor:
    """uint8 (3, size, size) training crop of one encoded image.

    params: with augment.random_resized_crop a row of crops.rrc_params (four uniforms, flip bit), else a row of
    batches.epoch_augment_params (dy, dx, flip). Flips only with augment.flip. `name` is for error messages.
    """
    params = np.asarray(params)
    if aug.random_resized_crop:
        scale, ratio = tuple(aug.rrc_scale), tuple(aug.rrc_ratio)
        out = _resized_crop(data, lambda w, h: rrc_box(params, w, h, scale, ratio), size, name)
        return out.flip(-1) if aug.flip and params[4] else out
    t = _full(data, size, name)
    dy, dx, flip = (int(v) for v in params[:3])
    p = aug.crop_padding
    if p:  # batches.augment's crop of the zero-padded image
        t = torch.nn.functional.pad(t, (p, p, p, p))[:, dy:dy + size, dx:dx + size]
    return (t.flip(-1) if aug.flip and flip else t).contiguous()


def decode_eval(data: bytes, size: int, eval_resize: int | None, *, name: str = "image") -> torch.Tensor:
    """uint8 (3, size, size) evaluation image: the shorter side resized to eval_resize and the centre size x size
    crop kept (torchvision's Resize + CenterCrop); eval_resize None: the whole image resized to size x size,
    exactly as in memory."""
    if eval_resize is None:
        return _full(data, size, name)
    return _resized_crop(data, lambda w, h: centre_box(w, h, eval_resize, size), size, name)


@contextmanager
def _opened(data: bytes, name: str) -> Iterator[Image.Image]:
    """Image.open on the bytes, with any failure (unreadable, truncated, too large) as one DataError line."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise _unreadable(name, exc) from None
    with im:
        yield im


def _unreadable(name: str, exc: Exception) -> DataError:
    return DataError(f"'{name}' is not a readable image ({type(exc).__name__}: {exc}); fix or remove it, then index "
                     f"the data again")


def _full(data: bytes, size: int, name: str) -> torch.Tensor:
    """The whole image at size x size, as the in-memory sources decode (convert to RGB, dataset.image_tensor)."""
    with _opened(data, name) as im:
        try:
            arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # grayscale, CMYK, palette, RGBA: RGB
        except Exception as exc:
            raise _unreadable(name, exc) from None
    return image_tensor(arr, size)[0]


def _reduction(w: float, h: float, size: int) -> int:
    """The largest JPEG decode scale 1/k that leaves a w x h box at least `size` px on both sides."""
    return next((k for k in _REDUCTIONS if min(w, h) / k >= size), 1)


def _resized_crop(data: bytes, box_of: BoxOf, size: int, name: str) -> torch.Tensor:
    """The box_of(width, height) = (left, top, w, h) box of the image resized to size x size, decoded at the
    largest reduction that leaves the box at least `size` px on both sides."""
    fast = _simplejpeg_crop(data, box_of, size)
    if fast is not None:
        return fast
    with _opened(data, name) as im:
        width, height = im.size
        left, top, w, h = box_of(width, height)
        k = _reduction(w, h, size)
        if k > 1:
            # draft picks the largest scale whose image is at least the size asked: (W // k, H // k) gives k.
            drafted = im.draft(im.mode, (width // k, height // k))  # None where the format cannot (PNG)
            k = width / drafted[1][2] if drafted else 1
        try:
            im.load()
            return _resized(im, (left / k, top / k, (left + w) / k, (top + h) / k), size, reduced=k > 1)
        except Exception as exc:
            raise _unreadable(name, exc) from None


@lru_cache(maxsize=1)
def _simplejpeg():
    """simplejpeg where installed: libjpeg-turbo straight into a numpy array, the header read in C. Measured on
    ImageNet-sized JPEGs: 0.84 ms a full decode against Pillow's 1.02 ms + 0.38 ms to get the array out, 0.63 ms
    against 0.73 at 1/8 scale. Its pixels are Pillow's, bit for bit, for YCbCr and grayscale JPEGs at every
    scale (tests/unit/test_decode.py), so a crop does not depend on whether it is installed."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _simplejpeg_crop(data: bytes, box_of: BoxOf, size: int) -> torch.Tensor | None:
    """_resized_crop through simplejpeg; None where Pillow should decode: simplejpeg absent, not a JPEG, CMYK
    (its RGB conversion differs from Pillow's by 1), or anything it finds wrong (Pillow then names the problem)."""
    sj = _simplejpeg()
    if sj is None or data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = sj.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray"):
            return None
        left, top, w, h = box_of(width, height)
        k = _reduction(w, h, size)
        arr = sj.decode_jpeg(data, "RGB", min_height=-(-height // k), min_width=-(-width // k))
    except Exception:
        return None
    if arr.shape[:2] != (-(-height // k), -(-width // k)):  # not the scale asked for: let Pillow decode
        return None
    return _resized(arr, (left / k, top / k, (left + w) / k, (top + h) / k), size, reduced=k > 1)


def _resized(src: Image.Image | np.ndarray, box: Box, size: int, reduced: bool) -> torch.Tensor:
    """The (left, top, right, bottom) box of a decoded image (Pillow's, or an RGB array) as uint8 (3, size, size).

    At full size the box is cropped (its corners whole pixels, or within half a pixel: the evaluation's box) and
    torch's vectorised uint8 antialiased bilinear kernel resizes it: 0.2 ms for 300 x 280 px to 224 against
    0.7 ms for Pillow's BILINEAR resize. On a reduced decode a pixel spans k of the original's, so rounding the
    corners would shift the crop visibly; there Pillow resizes the fractional box (as fast on such small images).
    """
    from PIL import Image
    from torchvision.transforms.v2.functional import resize

    left, top, right, bottom = box
    width, height = (src.shape[1], src.shape[0]) if isinstance(src, np.ndarray) else src.size
    if reduced:
        x0, y0, x1, y1 = math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)
    else:
        x0, y0, x1, y1 = round(left), round(top), round(right), round(bottom)
    x1, y1 = max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)
    if isinstance(src, np.ndarray) and not reduced:
        region = src[y0:y1, x0:x1]
    else:
        crop = (Image.fromarray(src) if isinstance(src, np.ndarray) else src).crop((x0, y0, x1, y1))
        if crop.mode != "RGB":  # convert is per pixel: converting the crop alone gives the same pixels
            crop = crop.convert("RGB")
        if reduced:
            crop = crop.resize((size, size), _BILINEAR, box=(left - x0, top - y0, right - x0, bottom - y0))
        region = np.asarray(crop)
    with warnings.catch_warnings():  # Pillow's arrays are read-only; the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(region).permute(2, 0, 1)
    return t if reduced else resize(t, [size, size], antialias=True)
