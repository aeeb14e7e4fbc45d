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


def test_a_negative_estimate_is_never_reported_only_none_until_both_terms_are_positive():
    """Early steps (or a noisy pair of norms) can leave the averaged tr(Sigma) or |G|^2 at or below zero, where
    their ratio is meaningless: the estimate is None ("not yet settled") wherever it is reported, never negative."""
    from alexdist.training.epoch_end import EpochEvaluation, _epoch_line
    from alexdist.training.evaluation import Evaluation

    estimate = GradientNoiseScale(8, 32)
    estimate.update(small_sq=1.0, big_sq=2.0)  # |G_small|^2 < |G_big|^2: tr(Sigma) < 0, |G|^2 > 0
    assert estimate.value is None and estimate.trace is None and estimate.grad_sq > 0
    assert estimate.facts()["b_simple"] is None
    test = Evaluation(loss=1.0, acc=0.5, confusion=[[1, 0], [0, 1]])
    train = {"loss": 1.0, "acc": 0.5, "images_per_s": 100.0, "noise_scale": estimate.value}
    assert "noise scale" not in _epoch_line(0, 1, train, EpochEvaluation(test=test), False)
    backwards = GradientNoiseScale(8, 32)
    backwards.update(small_sq=5.0, big_sq=4.5)  # tr(Sigma) > 0, |G|^2 = (32 * 4.5 - 8 * 5) / 24 > 0
    assert backwards.value > 0
    backwards.update(small_sq=20.0, big_sq=1.0)  # |G|^2's average now negative: its ratio says nothing
    assert backwards.grad_sq is None and backwards.value is None and backwards.trace > 0


def _probe_for(recipe_overrides: list[str], model=None):
    from types import SimpleNamespace

    from alexdist.config import load_recipe
    from alexdist.distributed.ddp import DDPStrategy

    recipe = load_recipe("quickstart", recipe_overrides)
    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    return DDPStrategy().gradient_probe(accelerator, model, recipe)


@pytest.mark.parametrize("accum", [1, 2])
def test_sync_batchnorm_mixes_the_ranks_gradients_so_the_noise_scale_is_not_measured(accum):
    """SyncBatchNorm normalises with every rank's statistics and its backward all-reduces through them: no rank's
    gradient is one small batch's alone, with accumulation or without."""
    why = _probe_for(["model.sync_bn=true", f"train.grad_accum={accum}"])
    assert isinstance(why, str) and "model.sync_bn" in why and "\n" not in why


def test_ddp_under_torchs_python_reducer_trains_without_the_communication_hook():
    """torch._dynamo.config.optimize_ddp="python_reducer" makes DDP call a communication hook once per parameter
    with (grad, param) and ignore what it returns: the bucket hook would crash in backward. The noise scale says
    why it is not measured, and the step's gradients are still all-reduced by DDP."""
    import torch._dynamo
    import torch._inductor.config
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from alexdist.distributed.launcher import free_port

    trace_rules = torch._dynamo.trace_rules
    inlined = "torch.nn.parallel.distributed" in trace_rules.LEGACY_MOD_INLINELIST
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with torch._dynamo.config.patch(optimize_ddp="python_reducer"), \
                torch._inductor.config.patch(_fuse_ddp_communication=False, _fuse_ddp_bucket_size=25):
            model = DDP(torch.nn.Linear(4, 1))
            why = _probe_for(["train.grad_accum=1"], model)
            model(torch.ones(2, 4)).sum().backward()
    finally:
        dist.destroy_process_group()
        if not inlined:  # DDP's python reducer adds itself to dynamo's inline list: leave the process as it was
            trace_rules.LEGACY_MOD_INLINELIST.discard("torch.nn.parallel.distributed")
            trace_rules.get_legacy_mod_inlinelist.cache_clear()
    assert isinstance(why, str) and "python_reducer" in why and "\n" not in why
    assert torch.equal(model.module.weight.grad, torch.full((1, 4), 2.0))


def test_the_averages_memory_is_a_window_of_examples_whatever_the_effective_batch():
    """tracking.noise_scale averages over the last ~WINDOW_EXAMPLES examples, not a fixed number of steps: after
    the same number of examples, a run at batch 8192 weighs its old estimates as little as one at batch 128, so a
    figure read at the target's crossing describes the same stretch of training at every batch."""
    from alexdist.training.noise_scale import WINDOW_EXAMPLES

    def share(batch: int) -> float:
        """The share of the average that a first 8,192 examples hold after 4 windows' worth of examples more."""
        est = GradientNoiseScale(64, batch)
        for _ in range(8192 // batch):
            est.update(small_sq=2.0, big_sq=1.0)
        first = est._trace / est._weight
        for _ in range(4 * WINDOW_EXAMPLES // batch):
            est.update(small_sq=1.0, big_sq=1.0)  # tr(Sigma) = 0 from here on
        return est._trace / est._weight / first

    small, big = share(128), share(8192)
    # 0.22 % at both batches; under the old fixed decay per step (0.99) the first 8,192 examples would still hold
    # 2.6 % of the large batch's average (32 steps later) and 5e-10 of the small batch's (2,048 steps later).
    assert small == pytest.approx(big, rel=0.05) and big < 0.05
    assert GradientNoiseScale(64, 128).facts()["window_examples"] == WINDOW_EXAMPLES


def test_the_two_terms_are_logged_beside_the_estimate_and_resume_exactly():
    est = GradientNoiseScale(64, 512)
    for small, big in [(3.0, 1.0), (2.5, 0.9), (4.0, 1.2)]:
        est.update(small, big)
    terms = est.terms()
    assert terms["noise_scale"] == pytest.approx(terms["grad_trace"] / terms["grad_sq"])
    assert set(terms) == {"noise_scale", "grad_sq", "grad_trace", "noise_window_examples"}
    resumed = GradientNoiseScale(64, 512)
    resumed.load_state_dict(est.state_dict())
    est.update(3.0, 1.1)
    resumed.update(3.0, 1.1)
    assert resumed.terms() == est.terms()
    old = {k: v for k, v in est.state_dict().items() if k != "weight"}  # a checkpoint written before the window
    legacy = GradientNoiseScale(64, 512)
    legacy.load_state_dict(old)
    assert legacy._weight == pytest.approx(1 - 0.99 ** est.steps)
