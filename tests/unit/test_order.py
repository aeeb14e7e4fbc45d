"""The sample order both data paths share (alexdist/data/order.py): a pure function of (seed, epoch, position)."""

import numpy as np
import pytest
import torch

from alexdist.data.order import epoch_augment_params, epoch_permutation, eval_shard, micro_positions

GLOBAL_BATCH = 48


def _global_order(n: int, world: int, accum: int, seed: int, epoch: int) -> list[list[int]]:
    """Per optimizer step, the samples every rank reads in it, micro-batch by micro-batch and rank by rank."""
    batch = GLOBAL_BATCH // (world * accum)
    perm = epoch_permutation(n, seed, epoch)
    steps = n // GLOBAL_BATCH
    return [[int(i) for j in range(accum) for r in range(world)
             for i in perm[micro_positions(s, j, r, world, batch, accum)]] for s in range(steps)]


@pytest.mark.parametrize("epoch", [0, 3])
def test_every_world_size_and_accumulation_reads_each_sample_once_per_epoch_in_one_global_order(epoch):
    n = 1000  # 20 steps of 48, 40 samples dropped (a different 40 each epoch)
    reference = _global_order(n, 1, 1, seed=7, epoch=epoch)
    flat = [i for step in reference for i in step]
    assert len(flat) == len(set(flat)) == (n // GLOBAL_BATCH) * GLOBAL_BATCH
    for world in (1, 2, 3, 4):
        for accum in (1, 2):
            order = _global_order(n, world, accum, seed=7, epoch=epoch)
            # the same samples in each optimizer step (the step's gradient is their mean, whatever their split)
            assert [sorted(s) for s in order] == [sorted(s) for s in reference], (world, accum)
            assert [i for s in order for i in s] == flat, (world, accum)  # and in the same global order


def test_the_order_changes_with_the_epoch_and_the_seed_and_drops_other_samples_each_epoch():
    a, b, c = (epoch_permutation(1000, s, e) for s, e in ((7, 0), (7, 1), (8, 0)))
    assert not torch.equal(a, b) and not torch.equal(a, c)
    kept = GLOBAL_BATCH * (1000 // GLOBAL_BATCH)
    assert set(a[kept:].tolist()) != set(b[kept:].tolist())


def test_evaluation_shards_are_disjoint_contiguous_and_cover_every_image():
    for world in (1, 2, 3, 4, 7):
        shards = [eval_shard(10, r, world).numpy() for r in range(world)]
        assert np.array_equal(np.concatenate(shards), np.arange(10))


@pytest.mark.parametrize("n", [1, 1000, 200_003])
def test_the_small_dtypes_the_streamed_path_keeps_hold_the_same_order_and_crops(n):
    assert torch.equal(epoch_permutation(n, 7, 2, torch.int32).long(), epoch_permutation(n, 7, 2))
    for padding, flip in ((4, True), (2, False)):
        small = epoch_augment_params(n, 7, 2, padding, flip, torch.int16)
        assert small.dtype == torch.int16 and torch.equal(small.long(), epoch_augment_params(n, 7, 2, padding, flip))
