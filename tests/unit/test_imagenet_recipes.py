"""What the ImageNet recipes add (pure functions and one evaluation, in this process): top-5 accuracy above 10
classes, counted exactly across ranks and absent at 10; torchvision's StepLR and the LARS paper's poly decay as
schedules; the recipes' published settings. (The recipes end to end: tests/e2e/test_imagenet_recipes.py.)"""

from types import SimpleNamespace

import pytest
import torch

from alexdist.config import ScheduleConfig, load_recipe
from alexdist.data.batches import MemoryEvalSet
from alexdist.training.evaluation import evaluate_ranks
from alexdist.training.optim import lr_factor, peak_lr


class Lookup(torch.nn.Module):
    """Logits read from a table by the image's index, written into its first pixel."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.table[(x[:, 0, 0, 0] * 255).round().long()] + self.w


def _set(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    y = torch.randint(0, k, (n,), generator=g)
    return MemoryEvalSet(x, y, 8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), torch.randn(n, k, generator=g)


def _ranks(data, net, world: int, k: int):
    """evaluate_ranks on each of `world` ranks, their reduce being the sum of every rank's own sums."""
    own = []
    for rank in range(world):  # first pass: what each rank sums on its own shard
        acc = SimpleNamespace(process_index=rank, num_processes=world, device=torch.device("cpu"),
                              reduce=lambda t, reduction: own.append(t.clone()) or t)
        evaluate_ranks(acc, net, data, 4, torch.float32, sharded=True, num_classes=k)
    total = torch.stack(own).sum(0)
    acc = SimpleNamespace(process_index=0, num_processes=world, device=torch.device("cpu"),
                          reduce=lambda t, reduction: total)
    return evaluate_ranks(acc, net, data, 4, torch.float32, sharded=True, num_classes=k)


def test_top5_is_counted_above_ten_classes_exactly_across_ranks_and_absent_at_ten():
    data, logits = _set(37, 12)
    net = Lookup(logits)
    expected = (logits.topk(5, 1).indices == data.y[:, None]).any(1).float().mean().item()
    alone = evaluate_ranks(None, net, data, 4, torch.float32, num_classes=12)
    assert alone.acc5 == pytest.approx(expected) and alone.acc <= alone.acc5 < 1
    assert alone.acc == pytest.approx((logits.argmax(1) == data.y).float().mean().item())
    three = _ranks(data, net, 3, 12)  # 37 images: shards of 13, 12, 12
    assert (three.acc, three.acc5, three.confusion) == (alone.acc, alone.acc5, alone.confusion)
    ten_data, ten_logits = _set(37, 10)
    ten = evaluate_ranks(None, Lookup(ten_logits), ten_data, 4, torch.float32, num_classes=10)
    assert ten.acc5 is None and sum(map(sum, ten.confusion)) == 37


def test_the_summary_has_top5_only_where_it_was_measured():
    from alexdist.checkpoint.state import TrainState
    from alexdist.tracking.summary import Ending, run_summary

    def summary(**state):
        return run_summary(load_recipe("quickstart"), TrainState(test_acc=0.5, **state), {}, Ending.FINISHED, [0],
                           0, "cpu", None, {})

    assert not [k for k in summary() if "acc5" in k]
    assert summary(test_acc5=0.8, val_acc5=0.7)["final_test_acc5"] == 0.8
    assert summary(test_acc5=0.8, val_acc5=0.7)["final_val_acc5"] == 0.7


def test_step_is_torchvisions_steplr_30_of_90_epochs_and_poly_decays_as_the_square():
    steps_per_epoch, total = 7, 90 * 7
    step = ScheduleConfig(name="step")
    factors = [lr_factor(s, total, step, 0) for s in range(total)]
    assert factors == pytest.approx([0.1 ** (s // steps_per_epoch // 30) for s in range(total)])
    poly = ScheduleConfig(name="poly")
    assert [lr_factor(s, 100, poly, 10) for s in (0, 9, 10, 55, 99)] == pytest.approx(
        [0.1, 1.0, 1.0, 0.25, (1 / 90) ** 2])


def test_the_imagenet_recipes_hold_their_published_settings():
    tv = load_recipe("imagenet_torchvision")
    assert tv.model.name == "torchvision.models:alexnet" and tv.train.global_batch == 256 and tv.train.epochs == 90
    assert (tv.optim.name, tv.optim.lr, tv.optim.momentum, tv.optim.weight_decay) == ("sgd", 0.01, 0.9, 1e-4)
    assert tv.schedule.name == "step" and not tv.optim.nesterov
    lars = load_recipe("imagenet_alexnet_bn_lars")
    assert lars.model.name == "alexnet_bn_lars2017" and lars.train.global_batch == 8192 and lars.train.epochs == 100
    assert (lars.optim.name, lars.optim.weight_decay, lars.optim.trust_coeff, lars.schedule.name) == (
        "lars", 5e-4, 0.001, "poly")
    assert peak_lr(lars.optim, 8192) == lars.optim.lr
    for r in (tv, lars):
        assert r.data.loader == "stream" and r.augment.random_resized_crop and r.data.eval_resize == 256
        assert r.data.mean == (0.485, 0.456, 0.406) and r.data.std == (0.229, 0.224, 0.225)
