"""Data of your own: the number of classes comes from the data and the model's head follows it (CIFAR-100's
Hub layout with `fine_label`), an image folder (torchvision's ImageFolder layout), parquet written by pandas
without the Hub's feature metadata; every malformed dataset stops at load time with one line naming the file or
row and the fix."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, check, error_line, launch, run_env
from PIL import Image
from safetensors import safe_open

from alexdist.config import DataConfig
from alexdist.data.cache import load_dataset
from alexdist.errors import DataError

SMALL = ["model.width_mult=0.25", "train.max_steps=2", "train.batch_size=8", "tracking.wandb=false"]


def _png(arr: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def cifar100_dir(tmp_path):
    """The Hub layout of uoft-cs/cifar100: img, fine_label (100 names), coarse_label (20 names)."""
    import datasets

    fine = [f"fine{i}" for i in range(100)]
    feats = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=fine),
                               "coarse_label": datasets.ClassLabel(names=[f"coarse{i}" for i in range(20)])})
    for split, n in (("train", 64), ("test", 16)):
        x = _images(n, seed=n)
        ds = datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in x], "fine_label": [i % 100 for i in
                                         range(n)], "coarse_label": [i % 20 for i in range(n)]}, features=feats)
        (tmp_path / "c100" / "cifar100").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(tmp_path / "c100" / "cifar100" / f"{split}-00000-of-00001.parquet"))
    return tmp_path / "c100"


def _pandas_parquet(root, labels=None, sizes=None):
    """Parquet as pandas writes it: an 'img' column of {'bytes', 'path'} records and integer labels, no Hub
    feature metadata."""
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 24), ("test", 8)):
        x = _images(n, seed=n)
        imgs = [{"bytes": _png(a if not sizes or i not in sizes else a[:sizes[i], :sizes[i]]), "path": None}
                for i, a in enumerate(x)]
        y = [i % 4 for i in range(n)] if labels is None or split == "test" else labels(n)
        pd.DataFrame({"img": imgs, "label": y}).to_parquet(root / f"{split}-00000-of-00001.parquet")
    return root


def _image_folder(root, classes=("cat", "dog", "fox"), test_classes=None, per_class=4, shape=(32, 32),
                  empty_train=()):
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            if split == "train" and name in empty_train:
                continue
            rng = np.random.default_rng(c * 10 + len(split))
            for i, a in enumerate(rng.integers(0, 256, (per_class, *shape, 3), dtype=np.uint8)):
                mode = ("RGB", "L", "RGBA", "P")[i % 4]  # any mode PIL reads
                (root / split / name / f"{i}.png").write_bytes(_png(a, mode))
    return root


@pytest.mark.slow
def test_cifar100_in_the_hub_layout_trains_with_a_100_way_head(cifar100_dir, tmp_path, cache_dir):
    ds = load_dataset(DataConfig(source=str(cifar100_dir), cache_dir=str(tmp_path / "c")))
    assert len(ds.classes) == 100 and ds.classes[7] == "fine7" and int(ds.train_y.max()) == 63
    run = tmp_path / "run"
    check(launch(SMALL + [f"data.source={cifar100_dir}", f"output_dir={run}"], cache_dir))
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("classifier.7.weight").shape[0] == 100
        assert len(json.loads(f.metadata()["classes"])) == 100
    proc = subprocess.run([sys.executable, "-m", "alexdist", "evaluate", str(run / "model.safetensors"), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=run_env(cache_dir))
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout.splitlines()[-1])["per_class_acc"]) == 100


@pytest.mark.slow
def test_an_image_folder_trains_and_predict_names_its_classes(tmp_path, cache_dir):
    root = _image_folder(tmp_path / "pets")
    ds = load_dataset(DataConfig(source=str(root), cache_dir=str(tmp_path / "c")))
    assert ds.classes == ["cat", "dog", "fox"] and len(ds.train_y) == 12 and ds.train_x.shape[1:] == (3, 32, 32)
    run = tmp_path / "run"
    check(launch(SMALL + [f"data.source={root}", "train.batch_size=4", f"output_dir={run}"], cache_dir))
    from alexdist.checkpoint.weights import classes_of, load_weights

    assert classes_of(load_weights(run / "model.safetensors")[1]) == ["cat", "dog", "fox"]  # in the metadata
    proc = subprocess.run([sys.executable, "-m", "alexdist", "predict", str(root / "test" / "fox" / "0.png"),
                           "--weights", str(run / "model.safetensors"), "--top-k", "1", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    top = json.loads(proc.stdout.splitlines()[-1])["top"]
    assert len(top) == 1 and top[0]["class"] in ("cat", "dog", "fox")  # a name, not a label index


def test_parquet_written_by_pandas_without_hub_metadata_loads(tmp_path):
    ds = load_dataset(DataConfig(source=str(_pandas_parquet(tmp_path / "pd")), cache_dir=str(tmp_path / "c")))
    assert ds.classes == ["0", "1", "2", "3"] and ds.train_x.shape == (24, 3, 32, 32)
    assert ds.train_x[0].permute(1, 2, 0).numpy().tolist() == _images(24, seed=24)[0].tolist()  # pixels as written


@pytest.mark.parametrize("make, words", [
    (lambda d: _pandas_parquet(d, labels=lambda n: [1] * 5 + [-1] + [0] * (n - 6)),
     "train row 5 has label -1, outside the 4 classes 0..3"),
    (lambda d: _image_folder(d, test_classes=("cat", "wolf")), "class folders the train split lacks (wolf)"),
    (lambda d: (_image_folder(d), [f.unlink() for f in (d / "test").rglob("*.png")])[0],
     "holds no images"),
    (lambda d: (_image_folder(d), (d / "train" / "dog" / "2.png").write_bytes(b"not a png"))[0],
     "2.png' is not a readable image"),
], ids=["negative-label", "unknown-test-class", "empty-test-split", "corrupt-image"])
def test_a_malformed_dataset_is_reported_at_load_time_naming_the_row_or_file(make, words, tmp_path):
    root = make(tmp_path / "data")
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(DataConfig(source=str(root), cache_dir=str(tmp_path / "c")))


@pytest.mark.slow
def test_a_malformed_dataset_stops_a_run_in_one_line_before_training(tmp_path, cache_dir):
    root = _pandas_parquet(tmp_path / "pd", labels=lambda n: [1] * 5 + [-1] + [0] * (n - 6))
    proc = launch(SMALL + [f"data.source={root}", f"output_dir={tmp_path / 'run'}"], cache_dir)
    assert proc.returncode == 3 and "row 5 has label -1" in error_line(proc)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_images_of_another_size_are_resized_once_and_cached_per_size(tmp_path, capsys):
    root = _image_folder(tmp_path / "wide", shape=(32, 40))  # 40x32 (width x height), any mode
    cfg = DataConfig(source=str(root), cache_dir=str(tmp_path / "c"))
    ds = load_dataset(cfg)
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.test_x.shape == (12, 3, 32, 32)
    err = capsys.readouterr().err
    assert err.count("alexdist: resized 24 of 24 images to 32x32 (antialiased bilinear") == 1
    load_dataset(cfg)  # from the cache: nothing resized again, nothing said
    assert "resized" not in capsys.readouterr().err
    big = load_dataset(DataConfig(source=str(root), cache_dir=str(tmp_path / "c"), image_size=48))
    assert big.train_x.shape == (12, 3, 48, 48) and len(list((tmp_path / "c").glob("*.safetensors"))) == 2
    from alexdist.data.dataset import resize

    x = torch.full((1, 3, 64, 64), 200, dtype=torch.uint8)
    assert torch.equal(resize(x, 16), torch.full((1, 3, 16, 16), 200, dtype=torch.uint8))  # antialiased: no ringing


def test_a_dataset_too_large_for_memory_at_its_image_size_is_refused_before_decoding(tmp_path):
    cfg = DataConfig(source="synthetic", synthetic_train=100_000, image_size=512, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"100000 images take about \d+\.\d GiB in memory .* lower data.image_size"):
        load_dataset(cfg.model_copy(update={"synthetic_test": 0}))
    assert not list(tmp_path.iterdir())  # nothing decoded, nothing cached


def test_labels_that_never_occur_in_train_are_named_in_one_warning(tmp_path):
    from alexdist.data.dataset import label_gap_warning

    stray = _pandas_parquet(tmp_path / "pd", labels=lambda n: [i % 10 for i in range(n - 1)] + [12])
    ds = load_dataset(DataConfig(source=str(stray), cache_dir=str(tmp_path / "c")))
    assert label_gap_warning(ds) == "labels 10, 11 never occur in train; the head has 13 outputs"
    folder = _image_folder(tmp_path / "pets", empty_train=("fox",))
    ds = load_dataset(DataConfig(source=str(folder), cache_dir=str(tmp_path / "c")))
    assert label_gap_warning(ds) == ("classes fox (label 2) have no train images: the model can only get them "
                                     "wrong; the head has 3 outputs")
    clean = load_dataset(DataConfig(source=str(_image_folder(tmp_path / "ok")), cache_dir=str(tmp_path / "c")))
    assert label_gap_warning(clean) is None


@pytest.mark.slow
def test_a_run_on_a_40x32_image_folder_trains_and_says_resized_and_label_gaps_once(tmp_path, cache_dir):
    root = _image_folder(tmp_path / "wide", shape=(32, 40), empty_train=("fox",))
    proc = check(launch(SMALL + [f"data.source={root}", "train.batch_size=4", f"output_dir={tmp_path / 'run'}"],
                        cache_dir, nproc=2))
    assert proc.stderr.count("alexdist: resized 20 of 20 images to 32x32") == 1
    assert proc.stderr.count("alexdist: warning: classes fox (label 2) have no train images") == 1
