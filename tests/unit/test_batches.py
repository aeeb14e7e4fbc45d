import contextlib
from types import SimpleNamespace

import pytest
import torch

from alexdist.config import AugmentConfig
from alexdist.data.batches import (
    TrainBatches,
    augment,
    epoch_augment_params,
    epoch_permutation,
    eval_shard,
    normalize,
)

N = 103  # not a multiple of any effective batch below


def _data(n=N):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    # label = sample index, so batches reveal which samples they hold
    return x, torch.arange(n)


def _batches(rank, world, batch, accum, seed=0, aug=None, size=32):
    x, y = _data()
    return TrainBatches(x, y, batch, accum, rank, world, seed, aug or AugmentConfig(), size)


@pytest.mark.parametrize("world, batch, accum", [(1, 8, 1), (2, 4, 1), (2, 2, 2), (3, 5, 2)])
def test_rank_shards_are_disjoint_and_cover_the_epoch_exactly_once(world, batch, accum):
    seen = []
    for rank in range(world):
        for micro in _batches(rank, world, batch, accum).epoch(epoch=3):
            assert len(micro) == accum
            for _, y in micro:
                assert len(y) == batch
                seen += y.tolist()
    eff = batch * world * accum
    covered = (N // eff) * eff
    assert len(seen) == len(set(seen)) == covered  # disjoint, and nothing but a dropped tail is missing
    assert set(seen) == set(epoch_permutation(N, 0, 3)[:covered].tolist())


def test_each_optimizer_step_holds_the_same_augmented_samples_for_any_world_size_and_accumulation():
    def step_content(world, batch, accum):
        steps = []
        per_rank = [list(_batches(r, world, batch, accum).epoch(epoch=1)) for r in range(world)]
        for s in range(len(per_rank[0])):
            items = {}
            for r in range(world):
                for x, y in per_rank[r][s]:
                    for xi, yi in zip(x, y, strict=False):
                        items[int(yi)] = xi
            steps.append(items)
        return steps

    ref = step_content(1, 16, 1)
    for world, batch, accum in [(2, 8, 1), (2, 4, 2), (1, 4, 4)]:
        other = step_content(world, batch, accum)
        assert len(other) == len(ref)
        for a, b in zip(ref, other, strict=False):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)  # same crop and flip for the same sample


def test_augmentation_is_deterministic_for_a_seed_and_changes_with_seed_and_epoch():
    first = next(_batches(0, 1, 16, 1, seed=5).epoch(2))[0][0]
    again = next(_batches(0, 1, 16, 1, seed=5).epoch(2))[0][0]
    assert torch.equal(first, again)
    assert not torch.equal(first, next(_batches(0, 1, 16, 1, seed=6).epoch(2))[0][0])
    assert not torch.equal(first, next(_batches(0, 1, 16, 1, seed=5).epoch(3))[0][0])


def test_resuming_mid_epoch_yields_the_remaining_steps_unchanged():
    full = list(_batches(0, 1, 8, 1).epoch(0))
    tail = list(_batches(0, 1, 8, 1).epoch(0, start_step=4))
    assert len(tail) == len(full) - 4
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(full[4:], tail, strict=False))


def test_crop_and_flip_move_pixels_as_torchvision_would():
    x, _ = _data(4)
    p = 4
    centre = torch.tensor([[p, p, 0]] * 4)
    assert torch.equal(augment(x, centre, p), x)  # offset = padding is the identity crop
    flipped = torch.tensor([[p, p, 1]] * 4)
    assert torch.equal(augment(x, flipped, p), x.flip(-1))
    corner = torch.tensor([[0, 0, 0]] * 4)
    out = augment(x, corner, p)
    assert (out[:, :, :p, :] == 0).all() and (out[:, :, :, :p] == 0).all()  # zero padding enters
    assert torch.equal(out[:, :, p:, p:], x[:, :, : 32 - p, : 32 - p])


def test_crop_offsets_cover_the_whole_padding_range():
    params = epoch_augment_params(5000, seed=0, epoch=0, padding=4, flip=True)
    assert params[:, :2].min() == 0 and params[:, :2].max() == 8
    assert 0.45 < params[:, 2].float().mean() < 0.55
    no_flip = epoch_augment_params(100, seed=0, epoch=0, padding=4, flip=False)
    assert (no_flip[:, 2] == 0).all()


def test_normalize_upsamples_for_the_227px_model():
    x, _ = _data(2)
    out = normalize(x, 227)
    assert out.shape == (2, 3, 227, 227) and out.dtype == torch.float32
    assert abs(normalize(x, 32).mean().item()) < 0.5  # roughly centred


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (7, 4), (10000, 2)])
def test_evaluation_counts_every_test_image_exactly_once(n, world):
    shards = [eval_shard(n, r, world).tolist() for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))


@pytest.mark.parametrize("padding,flip", [(4, True), (2, False), (0, True), (0, False)])
def test_batches_are_the_reference_augmentation_of_the_epoch_order(padding, flip):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(40)
    cfg = AugmentConfig(crop_padding=padding, flip=flip)
    tb = TrainBatches(x, y, 4, 1, 0, 1, 3, cfg, 8)
    perm = epoch_permutation(40, 3, 2)
    params = epoch_augment_params(40, 3, 2, padding, flip)
    for step, micro in enumerate(tb.epoch(2)):
        (xb, yb), = micro
        pos = tb.positions(step, 0)
        want = augment(x[perm[pos]], params[pos], padding)
        assert torch.equal(yb, y[perm[pos]])
        assert torch.equal(xb, normalize(want, 8))


def test_the_batches_keep_only_the_padded_source_never_the_images_twice():
    from alexdist.data.batches import source_bytes

    x, y = _data()
    for flip in (True, False):
        tb = TrainBatches(x, y, 8, 1, 0, 1, 0, AugmentConfig(crop_padding=4, flip=flip), 32)
        assert not hasattr(tb, "x")  # the images were copied into the source, not kept beside it
        assert tb._source.numel() == source_bytes(N, 32, 4, flip) == (2 if flip else 1) * N * 3 * 40 * 40


@pytest.mark.parametrize("place", ["cuda", "cpu"])
def test_training_data_that_would_not_fit_is_refused_in_one_line_with_the_figures(place, monkeypatch):
    """CIFAR-10 at 224 px: 45,000 training images padded and mirrored take 14.5 GB (they once took ~40 GB at
    peak, the images kept beside two padded copies), refused on a GPU with 10 GiB free, and on a host where 4
    processes would each keep them."""
    from alexdist.config import load_recipe
    from alexdist.errors import SetupError
    from alexdist.training import run_data

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(run_data, "available_memory", lambda: 32 * 2**30)
    monkeypatch.setattr(run_data, "local_processes", lambda: 4)
    recipe = load_recipe("bn", ["data.image_size=224"])
    alone = SimpleNamespace(num_processes=1, process_index=0, device=torch.device(place))
    with pytest.raises(SetupError) as err:
        run_data.check_memory(recipe, alone, torch.device(place), 45_000, 15_000, 224)
    words = ("15.6 GiB of GPU memory, more than the 10.0 GiB free on cuda; set speed.data_on_device=false"
             if place == "cuda" else "15.6 GiB of host memory per process, 62.5 GiB for the 4 on this node")
    assert words in str(err.value) and "\n" not in str(err.value)
    run_data.check_memory(recipe, alone, torch.device(place), 45_000, 15_000, 32)  # at 32 px: 0.3 GiB, fits


class _RankZeroOfTwo:
    """An Accelerator as rank 0 of two sees it: rank 1's figures come back from every gather (one row per rank)."""

    num_processes, process_index, is_main_process, device = 2, 0, True, torch.device("cpu")

    def __init__(self, rank1_row: list[float]):
        self.rank1_row = rank1_row

    def wait_for_everyone(self) -> None:
        """No other process to wait for."""

    def local_main_process_first(self):
        return contextlib.nullcontext()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, torch.tensor([self.rank1_row], dtype=t.dtype)])


def test_every_rank_refuses_data_that_would_not_fit_on_another_ranks_node(tmp_path, monkeypatch):
    """Free memory differs between nodes: a rank with room must not go on into the next collective while the rank
    without it refuses. Decided once on the tightest rank's figures, the same on every rank, naming that rank."""
    from alexdist.config import load_recipe
    from alexdist.errors import SetupError
    from alexdist.training import run_data

    monkeypatch.setattr(run_data, "available_memory", lambda: 64 * 2**30)  # this node: plenty
    monkeypatch.setattr(run_data, "local_processes", lambda: 1)
    recipe = load_recipe("quickstart", ["data.source=synthetic", "data.synthetic_train=512",
                                        "data.synthetic_test=64", f"data.cache_dir={tmp_path}"])
    with pytest.raises(SetupError) as err:
        run_data.run_data(recipe, _RankZeroOfTwo([2**20, 1]))  # rank 1's node: 1 MiB for its one process
    assert "GiB for the 1 on rank 1's node, more than the 0.0 GiB available" in str(err.value)
    assert "\n" not in str(err.value)
    fits = run_data.run_data(recipe, _RankZeroOfTwo([64 * 2**30, 1]))
    assert len(fits.test) == 64
