"""What indexing checks of each image, without decoding it (index.py), and the normalization it measures.

An image is opened with Pillow, which parses the header only (format, size, mode); a JPEG must also end with its
end-of-image marker (FF D9), which a truncated file lacks. That finds unreadable and cut-short files at a few KB
read per file. A JPEG whose last bytes are not the marker (some cameras append data after it) is decoded once to
decide. A PNG's chunks are verified to IEND (checksums, no decompression); other formats, rare in these sets,
are decoded. CMYK, grayscale, palette and PNG files named .JPEG pass: the loader converts them to RGB.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from alexdist.errors import brief

JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
STATS_SAMPLE = 1000  # train images the mean and std are measured over, evenly spaced
STATS_SIDE = 64  # each sampled image at this size (reduced-size JPEG decode), so each weighs the same


def check_image(fh: BinaryIO) -> str | None:
    """None when the image at the start of `fh` (a binary file open for reading, seekable) looks whole; else why
    not, in a few words for a one-line message."""
    from PIL import Image, UnidentifiedImageError

    # JPEG by its first bytes, as Pillow would find it, without trying each format in turn (a third faster)
    formats = ["JPEG"] if fh.read(2) == JPEG_START else None
    fh.seek(0)
    try:
        with Image.open(fh, formats=formats) as im:
            fmt, (w, h) = im.format, im.size
            if w < 1 or h < 1:
                return f"{fmt} image of size {w}x{h}"
            if fmt == "PNG":
                im.verify()
                return None
            if fmt == "JPEG" and _ends_with(fh, JPEG_END):
                return None
        fh.seek(0)
        with Image.open(fh) as im:  # not a JPEG ending in FF D9: a full decode decides
            im.load()
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for bad files
        return brief(exc)
    return None


def _ends_with(fh: BinaryIO, marker: bytes) -> bool:
    fh.seek(0, io.SEEK_END)
    if fh.tell() < len(marker):
        return False
    fh.seek(-len(marker), io.SEEK_END)
    return fh.read(len(marker)) == marker


def check_bytes(data: bytes) -> str | None:
    """check_image for encoded bytes in memory (a tar member, a parquet row)."""
    return check_image(io.BytesIO(data))


def mean_std(read: Callable[[int], bytes], n: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Per-channel mean and standard deviation (0..1 scale) over up to STATS_SAMPLE evenly spaced entries 0..n-1,
    each decoded at reduced size (Pillow's JPEG draft) and resized to STATS_SIDE square. An entry that fails to
    decode is left out of the sample (the loader names it when it reads it); None when none decodes."""
    from PIL import Image

    picks = np.unique(np.linspace(0, n - 1, min(n, STATS_SAMPLE)).round().astype(np.int64))
    total, squares, pixels = np.zeros(3), np.zeros(3), 0
    for i in picks:
        data = read(int(i))
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (STATS_SIDE, STATS_SIDE))  # JPEG: decoded at 1/2..1/8 scale, never below the side
                rgb = im.convert("RGB").resize((STATS_SIDE, STATS_SIDE), Image.BILINEAR)
        except Exception:
            continue
        x = np.asarray(rgb, dtype=np.float64).reshape(-1, 3) / 255.0
        total += x.sum(0)
        squares += (x * x).sum(0)
        pixels += len(x)
    if not pixels:
        return None
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean * mean, 1e-12))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)
