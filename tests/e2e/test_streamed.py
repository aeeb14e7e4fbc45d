"""The streamed data path (data.loader=stream) against the in-memory one, on real digits written as PNG files in
ImageNet's folder layout (train/CLASS/*, val/CLASS/*): with pad/crop/flip and full-size decode, the streamed
batches equal the in-memory ones byte for byte, so two launches of 2 CPU processes end with the same weights bit
for bit; a stop request mid-epoch and a relaunch (with another number of loader workers) end there too."""

from __future__ import annotations

import pytest
import torch
from helpers import check, launch, run_env, summary
from safetensors.torch import load_file

# 2 processes x 16 x accumulation 2 = 64 per step; 1437 training digits: 22 steps per epoch, 44 in all.
RUN = ["tracking.wandb=false", "train.epochs=2", "train.batch_size=16", "train.grad_accum=2", "augment.flip=false",
       "augment.crop_padding=2", "data.mean=[0.2,0.2,0.2]", "data.std=[0.3,0.3,0.3]", "train.log_every=5"]
STOP_AT = 31  # mid-epoch 2


def _write_digits(root):
    """scikit-learn's digits at 32 px (as data.source=digits decodes them), as PNG files: lossless, so the streamed
    decode sees the in-memory path's pixels."""
    from PIL import Image

    from alexdist.data.sources import _digits

    ds = _digits()
    for split, x, y in (("train", ds.train_x, ds.train_y), ("val", ds.test_x, ds.test_y)):
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            folder = root / split / f"digit{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return _write_digits(tmp_path_factory.mktemp("digits-folder"))


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def _launch(run, folder, cache_dir, loader, extra=(), fault=None):
    env = run_env(cache_dir, **({"ALEXDIST_FAULT": fault} if fault else {}))
    return launch([*RUN, f"data.source={folder}", f"data.loader={loader}", f"output_dir={run}", *extra], cache_dir,
                  nproc=2, env=env)


def test_streamed_batches_train_the_in_memory_paths_weights_bit_for_bit_and_resume_exactly(
        digits_folder, tmp_path, cache_dir):
    memory = check(_launch(tmp_path / "memory", digits_folder, cache_dir, "memory"))
    assert "data in memory" in memory.stdout
    streamed = check(_launch(tmp_path / "streamed", digits_folder, cache_dir, "stream", ["data.workers=2"]))
    assert "data streamed from disk (2 loader workers per process)" in streamed.stdout
    a, b = _weights(tmp_path / "memory"), _weights(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary(tmp_path / "streamed")["final_test_acc"] == summary(tmp_path / "memory")["final_test_acc"]
    assert summary(tmp_path / "streamed")["data_loader"] == "stream"
    # A stop mid-epoch, then a relaunch with another worker count: the same weights again.
    run = tmp_path / "stopped"
    stopped = _launch(run, digits_folder, cache_dir, "stream", ["data.workers=1"], fault=f"stop:{STOP_AT}:0")
    assert stopped.returncode != 0 and summary(run)["steps"] == STOP_AT, stopped.stderr[-3000:]
    check(_launch(run, digits_folder, cache_dir, "stream", ["data.workers=3"]))
    c = _weights(run)
    assert summary(run)["steps"] == 44 and all(torch.equal(a[k], c[k]) for k in a)
    # The control: one step fewer, the same comparison fails.
    check(_launch(tmp_path / "short", digits_folder, cache_dir, "stream", ["train.max_steps=43", "data.workers=2"]))
    d = _weights(tmp_path / "short")
    assert not all(torch.equal(a[k], d[k]) for k in a)


def test_a_resume_that_would_switch_data_paths_is_refused_in_one_line(digits_folder, tmp_path, cache_dir):
    run = tmp_path / "run"
    check(_launch(run, digits_folder, cache_dir, "stream", ["train.max_steps=3", "data.workers=0"]))
    proc = _launch(run, digits_folder, cache_dir, "memory")
    assert proc.returncode != 0
    assert "was trained with its data streamed from disk, this run would take it in memory; resume with " \
           "data.loader=stream" in proc.stdout + proc.stderr
