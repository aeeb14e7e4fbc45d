"""DivergenceGuard's decisions (unit level): what counts as a bad step, when a run must stop, and DeepSpeed's
minimum-loss-scale exception turned into the divergence error. The end-to-end runs are in test_divergence.py
and test_error_messages.py."""

from types import SimpleNamespace

import pytest
import torch

from alexdist.config import Recipe
from alexdist.distributed.strategies import strategy_named
from alexdist.training.divergence import DivergenceGuard, diverged


def _guard(max_bad=3, deepspeed=False, precision="no"):
    recipe = Recipe.model_validate({"train": {"max_bad_steps": max_bad}, "precision": precision})
    accelerator = SimpleNamespace(scaler=None, unwrap_model=lambda m, **kw: m)
    optimizer = SimpleNamespace(step_was_skipped=False)
    return DivergenceGuard(accelerator, optimizer, recipe, strategy_named("deepspeed" if deepspeed else "ddp"))


def test_bad_steps_in_a_row_stop_the_run_with_their_span_and_a_good_step_resets_the_count():
    g = _guard(max_bad=3)
    assert g.update(4, True) is None and g.update(5, True) is None
    assert g.update(6, False) is None  # reset
    assert g.update(7, True) is None and g.update(8, True) is None
    why = g.update(9, True)
    assert why == ("the loss or gradients were NaN/inf for 3 optimizer steps in a row (steps 7-9, "
                   "train.max_bad_steps=3)")


def test_a_single_allowed_bad_step_names_one_step():
    assert "for 1 optimizer steps in a row (step 5," in _guard(max_bad=1).update(5, True)


def _model_with_grads(value: float):
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
    return model


@pytest.mark.parametrize("loss, grad, bad", [(1.0, 0.5, False), (float("nan"), 0.5, True),
                                             (1.0, float("inf"), True), (1.0, float("nan"), True)])
def test_a_step_is_bad_when_its_loss_or_gradient_norm_is_not_finite(loss, grad, bad):
    g = _guard()
    flag, _ = g.bad_flag(_model_with_grads(grad), torch.tensor(loss), None)
    assert isinstance(flag, torch.Tensor) and bool(flag) is bad  # a tensor: agreed across ranks without a sync


def test_a_clipping_norm_is_used_instead_of_computing_another():
    g = _guard()
    assert bool(g.bad_flag(_model_with_grads(0.5), torch.tensor(1.0), torch.tensor(float("inf")))[0])


def test_under_deepspeed_the_engines_overflow_flag_decides():
    g = _guard(deepspeed=True)
    model = _model_with_grads(float("inf"))  # ZeRO frees its gradients: we never look at them
    assert not bool(g.bad_flag(model, torch.tensor(1.0), None)[0])
    g.optimizer.step_was_skipped = True
    assert bool(g.bad_flag(model, torch.tensor(1.0), None)[0])
    assert g.own_skip is False


def test_deepspeeds_minimum_loss_scale_exception_becomes_the_divergence_error():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=1.0, scale_window=1000, min_scale=1.0, delayed_shift=1,
                               consecutive_hysteresis=False, raise_error_at_min_scale=True)
    with pytest.raises(Exception) as raised:  # DeepSpeed's own words, from DeepSpeed's own code
        scaler.update_scale(overflow=True)
    deepspeed = strategy_named("deepspeed")
    assert "fp16_min_loss_scale" in deepspeed.backward_failure(raised.value)
    assert deepspeed.backward_failure(RuntimeError("CUDA out of memory")) is None
    err = diverged("why", "runs/x/checkpoints/step-0000040")
    assert err.exit_code == 6 and "step-0000040" in str(err) and "\n" not in str(err)


def test_the_backward_of_a_deepspeed_run_at_its_minimum_scale_ends_in_the_divergence_error():
    """loop._backward: DeepSpeed raises its plain Exception inside Accelerate's backward, on every rank."""
    from alexdist.errors import DivergedError
    from alexdist.training.loop import _backward

    def backward(loss):
        raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")

    run = SimpleNamespace(accelerator=SimpleNamespace(backward=backward), strategy=strategy_named("deepspeed"),
                          checkpointer=SimpleNamespace(latest=lambda: "runs/x/checkpoints/step-0000040"))
    with pytest.raises(DivergedError, match="fp16_min_loss_scale and the step still overflowed.*step-0000040"):
        _backward(run, torch.tensor(1.0))
    run.strategy = strategy_named("ddp")  # the same words from anything else are not ours to reinterpret
    with pytest.raises(Exception, match="already at minimum") as other:
        _backward(run, torch.tensor(1.0))
    assert not isinstance(other.value, DivergedError)
