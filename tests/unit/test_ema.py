"""train.ema_decay: an EMA of the weights evaluated beside the model, in every checkpoint, exactly resumable,
the run's model with train.ema_is_model; refused where ranks hold shards of the weights."""


import pytest
import torch

from alexdist.training.ema import ModelEMA

EMA = ["train.ema_decay=0.9", "train.ema_is_model=true", "train.epochs=2", "tracking.wandb=false"]


def test_the_average_follows_timms_warmup_and_swapping_restores_the_weights():
    net = torch.nn.Linear(3, 2)
    ema = ModelEMA(net, decay=0.9)
    start = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()  # t=0: decay min(0.9, 1/10) = 0.1, so the average moves 90 % of the way
    for e, s in zip(ema.params, start, strict=True):
        assert torch.allclose(e, s + 0.9)
    assert ema.decay_now() == pytest.approx(min(0.9, 2 / 11))
    live = [p.detach().clone() for p in net.parameters()]
    with ema.swapped() as module:
        assert all(torch.equal(p, e) for p, e in zip(module.parameters(), ema.params, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), live, strict=True))
    other = ModelEMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and all(torch.equal(a, b) for a, b in zip(other.params, ema.params, strict=True))


