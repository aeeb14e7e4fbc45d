"""The streamed path's batches (alexdist/data/streamed.py) over a small image folder, in the trainer's process: a
stop mid-epoch on 2 processes and a relaunch on 1 see the same samples and pixels at every step, and loader
workers that reuse their batch buffers hand the trainer the bytes the trainer decodes itself."""

import numpy as np
import pytest
import torch
from dataset_files import image_folder

from alexdist.config import AugmentConfig, DataConfig
from alexdist.data.index import build_index
from alexdist.data.streamed import RING, StreamBatches

CPU = torch.device("cpu")
EFFECTIVE, ACCUM = 8, 2  # 48 images: 6 optimizer steps per epoch
AUGMENTS = {"pad-flip": AugmentConfig(crop_padding=4, flip=True),
            "random-resized-crop": AugmentConfig(random_resized_crop=True)}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = image_folder(tmp_path_factory.mktemp("folder"), per_class=16, shape=(40, 36))
    return build_index(DataConfig(source=str(root), cache_dir=str(root.parent / "cache"), workers=0),
                       progress=False)


def _batches(index, rank: int, world: int, aug: AugmentConfig, workers: int = 0) -> StreamBatches:
    entries = np.arange(len(index.train))
    return StreamBatches(index.train, entries, EFFECTIVE // (world * ACCUM), ACCUM, rank, world, seed=5,
                         augment_cfg=aug, image_size=32, input_size=32, device=CPU, workers=workers)


def _steps(ranks: list[StreamBatches], epoch: int, start: int) -> list[tuple[list, torch.Tensor, torch.Tensor]]:
    """Per optimizer step: the sample ids every rank reads, and the step's images and labels, micro-batch by
    micro-batch and rank by rank (the global order of order.py)."""
    jobs = [list(r._epoch_jobs(epoch, start)) for r in ranks]
    out = []
    for s, steps in enumerate(zip(*(r.epoch(epoch, start) for r in ranks), strict=True)):
        ids = [int(i) for j in range(ACCUM) for r in range(len(ranks)) for i in jobs[r][s * ACCUM + j][0]]
        parts = [steps[r][j] for j in range(ACCUM) for r in range(len(ranks))]
        out.append((ids, torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])))
    return out


@pytest.mark.parametrize("aug", AUGMENTS.values(), ids=AUGMENTS.keys())
def test_a_stop_mid_epoch_on_2_processes_resumed_on_1_sees_the_same_samples_and_pixels_at_every_step(index, aug):
    two = [_batches(index, r, 2, aug) for r in range(2)]
    one = [_batches(index, 0, 1, aug)]
    assert two[0].steps_per_epoch == one[0].steps_per_epoch == 6
    for epoch, start in ((0, 3), (1, 0)):  # stopped after step 3 of epoch 0; on to the end of epoch 1
        a, b = _steps(two, epoch, start), _steps(one, epoch, start)
        assert len(a) == len(b) == 6 - start
        for step, ((ids_a, x_a, y_a), (ids_b, x_b, y_b)) in enumerate(zip(a, b, strict=True)):
            assert ids_a == ids_b and len(set(ids_a)) == EFFECTIVE, (epoch, start + step)
            assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b), (epoch, start + step)
    # and the relaunch reads what the uninterrupted epoch reads from that step on
    assert [s[0] for s in _steps(one, 0, 0)[3:]] == [s[0] for s in _steps(one, 0, 3)]


def _images(index, aug: AugmentConfig, workers: int, epochs: tuple[int, ...]) -> list[list[torch.Tensor]]:
    """Each epoch's micro-batch images, from one StreamBatches (its workers persist across epochs, and are gone
    when it returns, whatever the test then finds)."""
    batches = _batches(index, 0, 1, aug, workers)
    return [[x for step in batches.epoch(e) for x, _ in step] for e in epochs]


def test_loader_workers_reusing_their_batch_buffers_hand_over_the_trainers_own_decode(index):
    """More batches per worker than it has buffers, each kept as the trainer keeps it (until the next is taken):
    a buffer written again while the trainer still read it would show here."""
    aug = AUGMENTS["random-resized-crop"]
    [in_trainer] = _images(index, aug, 0, (1,))
    assert len(in_trainer) > RING  # 2 workers, 2 epochs: each worker fills every buffer more than once
    for got in _images(index, aug, 2, (1, 1)):
        assert len(got) == len(in_trainer) and all(torch.equal(a, b) for a, b in zip(in_trainer, got, strict=True))
