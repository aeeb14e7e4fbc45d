"""The streamed data path (data.loader=stream) against the in-memory one, on random images written as PNG files
in ImageNet's folder layout (train/CLASS/*, val/CLASS/*): with pad/crop/flip and full-size decode, the streamed
batches equal the in-memory ones byte for byte, so two launches of 2 CPU processes end with the same weights bit
for bit; a stop request mid-epoch and a relaunch (with another number of loader workers) end there too, and a
relaunch of that stop on 1 process ends within the in-memory path's float64 bound for another world size."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import FP64, FP64_BOUND, assert_same_training, check, flat, launch, rel, run_env, summary
from safetensors.torch import load_file

# 2 processes x 16 x accumulation 2 = 64 per step (32 x 2 on 1 process); 1437 training images: 22 steps per
# epoch, 44 in all. The conditions of the in-memory path's world-size checks (tests/helpers.py: EQUIV, FP64): no
# BatchNorm, no dropout, float64, random images.
RUN = ["tracking.wandb=false", "train.epochs=2", "train.global_batch=64", "train.grad_accum=2", "augment.flip=false",
       "augment.crop_padding=2", "data.mean=[0.5,0.5,0.5]", "data.std=[0.3,0.3,0.3]", "train.log_every=5",
       "model.name=alexnet_3x3", "model.width_mult=0.25", "model.dropout=0", *FP64]
STOP_AT = 31  # mid-epoch 2
TRAIN, TEST, CLASSES = 1437, 360, 10


def _write_images(root):
    """Random 32 px images as PNG files: lossless, so the streamed decode sees the in-memory path's pixels."""
    from PIL import Image

    g = np.random.default_rng(0)
    for split, n in (("train", TRAIN), ("val", TEST)):
        for i, (img, label) in enumerate(zip(g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                             g.integers(0, CLASSES, n), strict=True)):
            folder = root / split / f"class{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("image-folder"))


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def _launch(run, folder, cache_dir, loader, extra=(), fault=None, nproc=2):
    env = run_env(cache_dir, **({"ALEXDIST_FAULT": fault} if fault else {}))
    return launch([*RUN, f"data.source={folder}", f"data.loader={loader}", f"output_dir={run}", *extra], cache_dir,
                  nproc=nproc, env=env)


def test_streamed_batches_train_the_in_memory_paths_weights_bit_for_bit_and_resume_exactly(
        image_folder, tmp_path, cache_dir):
    memory = check(_launch(tmp_path / "memory", image_folder, cache_dir, "memory"))
    assert "data in memory" in memory.stdout
    streamed = check(_launch(tmp_path / "streamed", image_folder, cache_dir, "stream", ["data.workers=2"]))
    assert "data streamed from disk (2 loader workers per process)" in streamed.stdout
    a, b = _weights(tmp_path / "memory"), _weights(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary(tmp_path / "streamed")["final_test_acc"] == summary(tmp_path / "memory")["final_test_acc"]
    assert summary(tmp_path / "streamed")["data_loader"] == "stream"
    # A stop mid-epoch, then a relaunch with another worker count: the same weights again.
    run = tmp_path / "stopped"
    stopped = _launch(run, image_folder, cache_dir, "stream", ["data.workers=1"], fault=f"stop:{STOP_AT}:0")
    assert stopped.returncode != 0 and summary(run)["steps"] == STOP_AT, stopped.stderr[-3000:]
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    check(_launch(run, image_folder, cache_dir, "stream", ["data.workers=3"]))
    c = _weights(run)
    assert summary(run)["steps"] == 44 and all(torch.equal(a[k], c[k]) for k in a)
    # The same stop relaunched on 1 process: the same samples and pixels in every step (its per-process batch
    # is both ranks' micro-batches; tests/unit/test_streamed_batches.py), so the weights differ by rounding only.
    check(_launch(moved, image_folder, cache_dir, "stream", ["data.workers=2"], nproc=1))
    s = summary(moved)
    assert s["world_size"] == 1 and s["resumed_at_step"] == STOP_AT and s["steps"] == 44
    assert_same_training(flat(tmp_path / "memory"), flat(moved), "streamed, stopped on 2 processes, ended on 1")
    # The control: one step fewer, the same comparisons fail (by orders of magnitude for the bound).
    check(_launch(tmp_path / "short", image_folder, cache_dir, "stream", ["train.max_steps=43", "data.workers=2"]))
    d = _weights(tmp_path / "short")
    assert not all(torch.equal(a[k], d[k]) for k in a)
    with pytest.raises(AssertionError):
        assert_same_training(flat(tmp_path / "memory"), flat(tmp_path / "short"), "control")
    print(f"\nstreamed 2 -> 1 processes: {rel(flat(tmp_path / 'memory'), flat(moved)):.1e}; control (a step "
          f"fewer): {rel(flat(tmp_path / 'memory'), flat(tmp_path / 'short')):.1e}")
    assert rel(flat(tmp_path / "memory"), flat(tmp_path / "short")) > 1e4 * FP64_BOUND


def test_a_resume_that_would_switch_data_paths_is_refused_in_one_line(image_folder, tmp_path, cache_dir):
    run = tmp_path / "run"
    check(_launch(run, image_folder, cache_dir, "stream", ["train.max_steps=3", "data.workers=0"]))
    proc = _launch(run, image_folder, cache_dir, "memory")
    assert proc.returncode != 0
    assert "was trained with its data streamed from disk, this run would take it in memory; resume with " \
           "data.loader=stream" in proc.stdout + proc.stderr
