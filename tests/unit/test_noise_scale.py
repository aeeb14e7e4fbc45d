"""The gradient noise scale (training/noise_scale.py) on a problem whose answer is known in closed form, through
the probes that see the small batch's gradient in training (distributed/gradient_probe.py): the first of several
accumulated micro-batches (unit), and DDP's communication hook on 2 gloo ranks (e2e).

The problem and its closed form (B_noise = 26) are in tests/linear_regression.py.
"""

from __future__ import annotations

import pytest
import torch
from linear_regression import DECAY, STEPS, TOLERANCE, regression_at, sample

from alexdist.distributed.gradient_probe import AccumulationProbe
from alexdist.training.noise_scale import GradientNoiseScale, cost_line


def test_the_first_of_four_accumulated_micro_batches_measures_the_noise_scale():
    model, truth = regression_at()
    batch, accum = 8, 4
    probe = AccumulationProbe(torch.device("cpu"), batch, accum)
    estimate = GradientNoiseScale(batch, batch * accum, decay=DECAY)
    g = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    for _ in range(STEPS):
        probe.start_step()
        for micro in range(accum):
            x, y = sample(batch, g)
            (0.5 * (model(x).squeeze(1) - y).square().mean() / accum).backward()  # Accelerate divides the loss
            probe.after_backward(micro, params)
        estimate.update(probe.small_sq.item(), model.weight.grad.square().sum().item())
        model.weight.grad = None
    print(f"\naccumulation 4 x 8: B_simple {estimate.value:.2f}, closed form {truth:.2f}")
    assert estimate.steps == STEPS and estimate.value == pytest.approx(truth, rel=TOLERANCE)


@pytest.mark.parametrize("mistake, factor", [("small batch not rescaled by grad_accum", 1 / 16),
                                             ("big batch taken as the small one", 1.0)])
def test_a_wrongly_scaled_norm_misses_the_closed_form_by_far_more_than_the_tolerance(mistake, factor):
    """The controls: the same estimate fed a |G_small|^2 off by accumulation's factor, or |G_big|^2 in its
    place, lands far from the truth."""
    model, truth = regression_at()
    batch, accum = 8, 4
    estimate = GradientNoiseScale(batch, batch * accum, decay=DECAY)
    g = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        xs, ys = sample(batch * accum, g)
        grads = xs * (xs @ model.weight.detach()[0] - ys)[:, None]
        big = grads.mean(0).square().sum().item()
        small = grads[:batch].mean(0).square().sum().item() * factor if factor != 1.0 else big
        estimate.update(small, big)
    value = estimate.value
    off = abs((value or 0) - truth) / truth
    print(f"\ncontrol ({mistake}): {value}, closed form {truth:.2f}, off by {off:.0%}")
    assert off > 3 * TOLERANCE


def test_the_cost_line_appears_only_well_above_the_noise_scale():
    assert cost_line(512, 1000) is None and cost_line(1999, 1000) is None
    line = cost_line(8192, 1000)
    assert "8.2x the measured gradient noise scale (1,000)" in line and "~9.2x the examples" in line
    assert "1.12x the minimum steps" in line
