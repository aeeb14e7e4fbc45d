"""Data of your own: the number of classes comes from the data and the model's head follows it (CIFAR-100's
Hub layout with `fine_label`), an image folder (torchvision's ImageFolder layout), parquet written by pandas
without the Hub's feature metadata; every malformed dataset stops at load time with one line naming the file or
row and the fix."""

import json
import subprocess
import sys

import pytest
from dataset_files import image_folder, images, pandas_parquet
from helpers import ROOT, check, error_line, launch, run_env
from PIL import Image
from safetensors import safe_open

from alexdist.config import DataConfig
from alexdist.data.cache import load_dataset

SMALL = ["model.width_mult=0.25", "train.max_steps=2", "train.batch_size=8", "tracking.wandb=false"]


@pytest.fixture
def cifar100_dir(tmp_path):
    """The Hub layout of uoft-cs/cifar100: img, fine_label (100 names), coarse_label (20 names)."""
    import datasets

    fine = [f"fine{i}" for i in range(100)]
    feats = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=fine),
                               "coarse_label": datasets.ClassLabel(names=[f"coarse{i}" for i in range(20)])})
    for split, n in (("train", 64), ("test", 16)):
        x = images(n, seed=n)
        ds = datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in x], "fine_label": [i % 100 for i in
                                         range(n)], "coarse_label": [i % 20 for i in range(n)]}, features=feats)
        (tmp_path / "c100" / "cifar100").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(tmp_path / "c100" / "cifar100" / f"{split}-00000-of-00001.parquet"))
    return tmp_path / "c100"


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


def test_an_image_folder_trains_and_predict_names_its_classes(tmp_path, cache_dir):
    root = image_folder(tmp_path / "pets")
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


def test_a_malformed_dataset_stops_a_run_in_one_line_before_training(tmp_path, cache_dir):
    root = pandas_parquet(tmp_path / "pd", labels=lambda n: [1] * 5 + [-1] + [0] * (n - 6))
    proc = launch(SMALL + [f"data.source={root}", f"output_dir={tmp_path / 'run'}"], cache_dir)
    assert proc.returncode == 3 and "row 5 has label -1" in error_line(proc)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_on_a_40x32_image_folder_trains_and_says_resized_and_label_gaps_once(tmp_path, cache_dir):
    root = image_folder(tmp_path / "wide", shape=(32, 40), empty_train=("fox",))
    proc = check(launch(SMALL + [f"data.source={root}", "train.batch_size=4", f"output_dir={tmp_path / 'run'}"],
                        cache_dir, nproc=2))
    assert proc.stderr.count("alexdist: resized 20 of 20 images to 32x32") == 1
    assert proc.stderr.count("alexdist: warning: classes fox (label 2) have no train images") == 1
