"""Data of your own: the number of classes comes from the data and the model's head follows it (CIFAR-100's
Hub layout with `fine_label`), an image folder (torchvision's ImageFolder layout), parquet written by pandas
without the Hub's feature metadata; every malformed dataset stops at load time with one line naming the file or
row and the fix."""


import pytest
import torch
from dataset_files import image_folder, images, pandas_parquet

from alexdist.config import DataConfig
from alexdist.data.cache import load_dataset
from alexdist.errors import DataError


def test_parquet_written_by_pandas_without_hub_metadata_loads(tmp_path):
    ds = load_dataset(DataConfig(source=str(pandas_parquet(tmp_path / "pd")), cache_dir=str(tmp_path / "c")))
    assert ds.classes == ["0", "1", "2", "3"] and ds.train_x.shape == (24, 3, 32, 32)
    assert ds.train_x[0].permute(1, 2, 0).numpy().tolist() == images(24, seed=24)[0].tolist()  # pixels as written


@pytest.mark.parametrize("make, words", [
    (lambda d: pandas_parquet(d, labels=lambda n: [1] * 5 + [-1] + [0] * (n - 6)),
     "train row 5 has label -1, outside the 4 classes 0..3"),
    (lambda d: image_folder(d, test_classes=("cat", "wolf")), "class folders the train split lacks (wolf)"),
    (lambda d: (image_folder(d), [f.unlink() for f in (d / "test").rglob("*.png")])[0],
     "holds no images"),
    (lambda d: (image_folder(d), (d / "train" / "dog" / "2.png").write_bytes(b"not a png"))[0],
     "2.png' is not a readable image"),
], ids=["negative-label", "unknown-test-class", "empty-test-split", "corrupt-image"])
def test_a_malformed_dataset_is_reported_at_load_time_naming_the_row_or_file(make, words, tmp_path):
    root = make(tmp_path / "data")
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(DataConfig(source=str(root), cache_dir=str(tmp_path / "c")))


def test_images_of_another_size_are_resized_once_and_cached_per_size(tmp_path, capsys):
    root = image_folder(tmp_path / "wide", shape=(32, 40))  # 40x32 (width x height), any mode
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

    stray = pandas_parquet(tmp_path / "pd", labels=lambda n: [i % 10 for i in range(n - 1)] + [12])
    ds = load_dataset(DataConfig(source=str(stray), cache_dir=str(tmp_path / "c")))
    assert label_gap_warning(ds.train_y, ds.classes) == "labels 10, 11 never occur in train; the head has 13 outputs"
    folder = image_folder(tmp_path / "pets", empty_train=("fox",))
    ds = load_dataset(DataConfig(source=str(folder), cache_dir=str(tmp_path / "c")))
    assert label_gap_warning(ds.train_y, ds.classes) == ("classes fox (label 2) have no train images: the model can "
                                                         "only get them wrong; the head has 3 outputs")
    clean = load_dataset(DataConfig(source=str(image_folder(tmp_path / "ok")), cache_dir=str(tmp_path / "c")))
    assert label_gap_warning(clean.train_y, clean.classes) is None


