"""The streamed path's decode and crop functions: the padded crop equals the in-memory path byte for byte, the
random-resized-crop draws are pure functions of (seed, epoch, position) with torchvision's distribution, reduced
JPEG decodes are used where the crop allows and look like a full decode, every image mode gives RGB, and the
crops are the same bit for bit whether simplejpeg or Pillow decodes (tests marked `decoder` run with each; the
simplejpeg ones are skipped where it is not installed)."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from alexdist.config import AugmentConfig
from alexdist.data import decode
from alexdist.data.batches import augment, epoch_augment_params
from alexdist.data.crops import BLOCK, centre_box, rrc_box, rrc_params
from alexdist.data.dataset import image_tensor
from alexdist.data.decode import decode_eval, decode_train
from alexdist.errors import DataError

RRC = AugmentConfig(random_resized_crop=True)


@pytest.fixture(params=["pillow", "simplejpeg"])
def decoder(request, monkeypatch) -> str:
    """Each JPEG decoder decode.py can use: Pillow always, simplejpeg where installed."""
    if request.param == "pillow":
        monkeypatch.setattr(decode, "_simplejpeg", lambda: None)
    else:
        pytest.importorskip("simplejpeg")
    return request.param


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus mild noise: photo-like enough for JPEG's reduced decodes to be meaningful."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [np.sin(xx * f1 * 6 + yy * f2 * 6 + ph) for f1, f2, ph in g.uniform(0.3, 1.5, (3, 3))]
    arr = 127.5 + 100 * np.stack(chans, -1) + g.normal(0, 4, (h, w, 3))
    return arr.clip(0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _in_memory(data: bytes, size: int) -> torch.Tensor:
    """What the in-memory sources store for these bytes (sources.py, imagefolder.py)."""
    with Image.open(io.BytesIO(data)) as im:
        return image_tensor(np.asarray(im.convert("RGB")), size)[0]


MIXED = [(32, 32, "PNG"), (40, 29, "JPEG"), (100, 75, "JPEG"), (17, 50, "PNG"), (64, 64, "JPEG")]


@pytest.mark.parametrize("aug", [AugmentConfig(), AugmentConfig(crop_padding=2, flip=False),
                                 AugmentConfig(crop_padding=0)], ids=["pad4-flip", "pad2", "pad0-flip"])
def test_padded_crop_decode_equals_the_in_memory_augment_byte_for_byte(aug):
    params = epoch_augment_params(len(MIXED) * 4, seed=3, epoch=1, padding=aug.crop_padding, flip=aug.flip)
    for i, (w, h, fmt) in enumerate(MIXED * 4):
        data = _encode(_photo(w, h, seed=i), fmt)
        want = augment(_in_memory(data, 32)[None], params[i:i + 1], aug.crop_padding)[0]
        got = decode_train(data, params[i].numpy(), 32, aug)
        assert got.dtype == torch.uint8 and got.is_contiguous()
        assert torch.equal(got, want), (i, w, h, fmt)


def test_eval_without_eval_resize_equals_the_in_memory_image():
    for i, (w, h, fmt) in enumerate(MIXED):
        data = _encode(_photo(w, h, seed=i), fmt)
        assert torch.equal(decode_eval(data, 32, None), _in_memory(data, 32))


def test_rrc_params_are_the_same_for_a_position_whatever_the_positions_asked_with_it():
    everything = rrc_params(7, 2, np.arange(3 * BLOCK))
    g = np.random.default_rng(0)
    subset = g.permutation(3 * BLOCK)[:500]  # across blocks, in any order
    assert np.array_equal(rrc_params(7, 2, subset), everything[subset])
    assert np.array_equal(rrc_params(7, 2, np.array([BLOCK + 5])), everything[[BLOCK + 5]])
    assert not np.array_equal(rrc_params(7, 3, np.arange(100)), everything[:100])  # another epoch, other draws
    assert not np.array_equal(rrc_params(8, 2, np.arange(100)), everything[:100])
    assert ((everything[:, :4] >= 0) & (everything[:, :4] < 1)).all()
    assert set(np.unique(everything[:, 4])) == {0.0, 1.0} and abs(everything[:, 4].mean() - 0.5) < 0.02


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (0.2, 5.0)),
                                          ((0.01, 0.02), (1.0, 1.0))])
def test_rrc_box_stays_inside_the_image(scale, ratio):
    params = rrc_params(0, 0, np.arange(600))
    for width, height in [(500, 375), (375, 500), (1000, 120), (3, 3), (1, 40)]:
        for row in params:
            left, top, w, h = rrc_box(row, width, height, scale, ratio)
            assert left >= 0 and top >= 0 and w >= 1 and h >= 1 and left + w <= width and top + h <= height


def test_rrc_box_area_and_aspect_are_uniform_in_the_configured_ranges():
    """Where every box fits (area share <= 0.5 on a 4:3 image), the area share is uniform in scale and the log
    aspect uniform in log(ratio)."""
    params = rrc_params(1, 0, np.arange(20_000))
    boxes = np.array([rrc_box(r, 500, 375, (0.08, 0.5), (3 / 4, 4 / 3)) for r in params])
    area = boxes[:, 2] * boxes[:, 3] / (500 * 375)
    log_aspect = np.log(boxes[:, 2] / boxes[:, 3])
    assert abs(area.mean() - 0.29) < 0.29 * 0.02
    assert abs(log_aspect.mean()) < 0.01 and abs(log_aspect.std() - 2 * math.log(4 / 3) / math.sqrt(12)) < 0.01
    cdf = np.searchsorted(np.sort(area), np.linspace(0.1, 0.48, 20)) / len(area)
    assert np.abs(cdf - (np.linspace(0.1, 0.48, 20) - 0.08) / 0.42).max() < 0.02  # uniform
    assert (boxes[:, 0] + boxes[:, 2] / 2).mean() == pytest.approx(250, rel=0.02)  # centred on average


def test_rrc_box_matches_torchvisions_distribution_where_boxes_do_not_fit():
    """At the default ranges many boxes do not fit a 4:3 image; torchvision draws those again, and so does
    rrc_box: the mean area share and aspect are torchvision's (clamping them would give 0.52, not 0.43)."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(1, 375, 500)
    theirs = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(5000)])
    ours = np.array([rrc_box(r, 500, 375, (0.08, 1.0), (3 / 4, 4 / 3)) for r in rrc_params(0, 0, np.arange(5000))])
    area_theirs, area_ours = (theirs[:, 2] * theirs[:, 3]).mean(), (ours[:, 2] * ours[:, 3]).mean()
    assert area_ours == pytest.approx(area_theirs, rel=0.03)
    assert np.log(ours[:, 2] / ours[:, 3]).mean() == pytest.approx(np.log(theirs[:, 3] / theirs[:, 2]).mean(), abs=0.01)


def _decoded_sizes(monkeypatch, decoder: str) -> list[tuple[int, int]]:
    """Records the (width, height) each JPEG is decoded at, by either decoder."""
    sizes = []
    if decoder == "pillow":
        from PIL import JpegImagePlugin

        draft = JpegImagePlugin.JpegImageFile.draft

        def spy(self, mode, size):
            out = draft(self, mode, size)
            sizes.append(self.size)
            return out

        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    else:
        import simplejpeg

        decode_jpeg = simplejpeg.decode_jpeg

        def spy(data, *args, **kwargs):
            arr = decode_jpeg(data, *args, **kwargs)
            sizes.append((arr.shape[1], arr.shape[0]))
            return arr

        monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    return sizes


def _resized_box(arr: np.ndarray, box, size: int) -> torch.Tensor:
    """The box of a fully decoded image, resized as the in-memory path resizes."""
    left, top, w, h = (round(v) for v in box)
    return image_tensor(arr[top:top + h, left:left + w], size)[0]


@pytest.mark.parametrize("size, scale", [(32, 8), (64, 4), (160, 2)])
def test_large_crops_decode_at_reduced_size_close_to_a_full_decode(monkeypatch, decoder, size, scale):
    arr = _photo(640, 480)
    data = _encode(arr)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    sizes = _decoded_sizes(monkeypatch, decoder)
    row = np.array([0.99, 0.5, 0.3, 0.6, 0.0])  # nearly the whole image: its shorter side >= 8 * 32 px
    got = decode_train(data, row, size, RRC)
    box = rrc_box(row, 640, 480, RRC.rrc_scale, RRC.rrc_ratio)
    assert sizes == [(640 // scale, 480 // scale)]
    assert (got.float() - _resized_box(full, box, size).float()).abs().mean() < 1


def test_small_crops_decode_at_full_size_as_torchvisions_resized_crop(monkeypatch, decoder):
    from torchvision.transforms.v2.functional import resized_crop

    data = _encode(_photo(500, 375))
    full = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    sizes = _decoded_sizes(monkeypatch, decoder)
    for row in rrc_params(0, 0, np.arange(8)):
        left, top, w, h = rrc_box(row, 500, 375, RRC.rrc_scale, RRC.rrc_ratio)
        want = resized_crop(full, top, left, h, w, [224, 224], antialias=True)
        want = want.flip(-1) if row[4] else want
        assert (decode_train(data, row, 224, RRC).int() - want.int()).abs().max() <= 1
    assert set(sizes) <= {(500, 375)}


@pytest.mark.parametrize("size, eval_resize, shape", [(224, 256, (500, 375)), (32, 37, (640, 480)),
                                                      (64, 73, (333, 500))])
def test_eval_crop_is_torchvisions_resize_and_centre_crop(decoder, size, eval_resize, shape):
    from torchvision import transforms as T

    data = _encode(_photo(*shape))
    ref = T.Compose([T.Resize(eval_resize), T.CenterCrop(size), T.PILToTensor()])(Image.open(io.BytesIO(data)))
    got = decode_eval(data, size, eval_resize)
    assert got.shape == (3, size, size) and got.dtype == torch.uint8
    assert (got.float() - ref.float()).abs().mean() < 1  # reduced decodes at 32 and 64 px
    left, top, w, h = centre_box(*shape, eval_resize, size)
    assert w == pytest.approx(size * min(shape) / eval_resize, rel=0.01) and h == pytest.approx(w, rel=0.01)
    assert abs(left + w / 2 - shape[0] / 2) < w / size and abs(top + h / 2 - shape[1] / 2) < h / size


@pytest.mark.parametrize("fmt, mode", [("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "P"), ("PNG", "RGBA"),
                                       ("PNG", "LA"), ("PNG", "I;16")])
def test_every_image_mode_decodes_to_three_channels(decoder, fmt, mode):
    arr = _photo(300, 200)
    data = _encode(arr, fmt, mode)
    row = np.array([0.9, 0.5, 0.5, 0.5, 1.0])
    for out in (decode_train(data, row, 32, RRC), decode_train(data, np.array([1, 2, 1]), 32, AugmentConfig()),
                decode_eval(data, 32, 37), decode_eval(data, 32, None)):
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        if mode in ("L", "LA", "I;16"):
            assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    if mode == "CMYK":  # a reduced decode of a CMYK JPEG keeps its colours
        full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        want = _resized_box(full, rrc_box(row, 300, 200, RRC.rrc_scale, RRC.rrc_ratio), 32).flip(-1)
        assert (decode_train(data, row, 32, RRC).float() - want.float()).abs().mean() < 1


@pytest.mark.parametrize("call", [lambda d: decode_train(d, np.array([0.5] * 5), 32, RRC, name="a/b.JPEG"),
                                    lambda d: decode_train(d, np.array([0, 0, 0]), 32, AugmentConfig(),
                                                           name="a/b.JPEG"),
                                    lambda d: decode_eval(d, 32, 37, name="a/b.JPEG")],
                         ids=["rrc", "padded", "eval"])
def test_unreadable_bytes_are_one_data_error_naming_the_file(decoder, call):
    data = _encode(_photo(300, 200))
    for bad in (data[: len(data) // 2], data[:2] + b"\x00" * 200, b"not an image"):
        with pytest.raises(DataError, match=r"^'a/b\.JPEG' is not a readable image .*fix or remove it"):
            call(bad)


def test_simplejpeg_and_pillow_crop_the_same_pixels(monkeypatch):
    """A run's crops do not depend on which decoder the machine has: colour (4:2:0, 4:4:4, progressive) and
    grayscale JPEGs, at full and reduced scales, training and evaluation crops."""
    pytest.importorskip("simplejpeg")
    cases = []
    for i, (kwargs, mode) in enumerate([({}, None), ({"subsampling": 0}, None), ({"progressive": True}, None),
                                        ({}, "L")]):
        im = Image.fromarray(_photo(500 - 60 * i, 375, seed=i))
        buf = io.BytesIO()
        (im.convert(mode) if mode else im).save(buf, "JPEG", quality=90, **kwargs)
        cases.append(buf.getvalue())
    rows = rrc_params(5, 0, np.arange(6))
    rows[:3, 0] = 0.99  # large boxes: reduced decodes at 32 and 64 px

    def crops() -> list[torch.Tensor]:
        return [decode_train(d, r, s, RRC) for d in cases for r in rows for s in (224, 64, 32)] + \
               [decode_eval(d, s, e) for d in cases for s, e in ((224, 256), (64, 73), (32, 37))]

    sizes = _decoded_sizes(monkeypatch, "simplejpeg")
    fast = crops()
    assert len(sizes) == len(fast) and len(set(sizes)) > len(cases)  # simplejpeg decoded all, some reduced
    monkeypatch.setattr(decode, "_simplejpeg", lambda: None)
    assert all(torch.equal(a, b) for a, b in zip(fast, crops(), strict=True))
