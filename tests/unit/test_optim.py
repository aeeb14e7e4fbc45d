"""The optimizers a recipe can name: fused SGD's momentum when fp16 skips its first step, and LARS's layer-wise
adaptation with BatchNorm weights and biases left out."""

import pytest
import torch

from alexdist.config import load_recipe
from alexdist.errors import ConfigError, SetupError
from alexdist.training.optim import make_optimizer, zero_momentum_buffers


def _fused_sgd_skipping_its_first_step(zero_init: bool, monkeypatch) -> torch.Tensor:
    """A fused SGD step that GradScaler marks as overflowed (found_inf=1), as on fp16's first steps; returns the
    momentum buffer it leaves. `torch.empty_like` is made to return NaN so that never-written memory shows."""
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real(t, **kw).fill_(float("nan")))
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    if zero_init:
        zero_momentum_buffers(opt)
    p.grad = torch.full_like(p, float("inf"))
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())  # what GradScaler.step hands a fused kernel
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4))  # the skipped step leaves the weights alone either way
    return opt.state[p]["momentum_buffer"]


def test_fused_sgd_keeps_zero_momentum_not_uninitialised_memory_when_its_first_step_is_skipped(monkeypatch):
    assert torch.isnan(_fused_sgd_skipping_its_first_step(False, monkeypatch)).all()  # torch's defect (control)
    assert torch.equal(_fused_sgd_skipping_its_first_step(True, monkeypatch), torch.zeros(4))


def test_the_momentum_hook_lets_later_hooks_run_and_keeps_loaded_buffers(monkeypatch):
    """The hook used to remove itself while torch iterated the pre-step hooks: any hook registered after it made
    the first step fail ("OrderedDict mutated during iteration"). And a resumed run's loaded buffers must stay,
    without a zeros allocation per parameter."""
    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
    zero_momentum_buffers(opt)
    later = []
    opt.register_step_pre_hook(lambda o, a, k: later.append(1))
    loaded = torch.full((4,), 7.0)
    opt.state[params[0]]["momentum_buffer"] = loaded  # as a resume loads it
    made = []
    real = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda t, **kw: made.append(t.shape) or real(t, **kw))
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert later == [1, 1]  # the later hook ran at both steps
    assert made == [torch.Size([3])]  # only the parameter without a loaded buffer got zeros, once
    assert opt.state[params[0]]["momentum_buffer"] is loaded


def test_zero_initialised_momentum_gives_the_same_steps_as_torchs_own_init():
    torch.manual_seed(0)
    grads = [torch.randn(5) for _ in range(3)]
    out = []
    for zero_init in (False, True):
        p = torch.nn.Parameter(torch.ones(5))
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)
        if zero_init:
            zero_momentum_buffers(opt)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append(p.detach().clone())
    assert torch.equal(out[0], out[1])


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 10))


def test_lars_adapts_and_decays_weights_but_not_batchnorm_weights_or_biases():
    model = _model()
    recipe = load_recipe(None, ["optim.name=lars", "optim.weight_decay=1e-3", "optim.trust_coeff=0.01"])
    opt = make_optimizer(model, recipe, lr=1.0)
    assert type(opt).__name__ == "Lars"
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    bn, fc = model[1], model[3]
    assert by_decay[0.0] == {id(bn.weight), id(bn.bias), id(fc.bias)}
    assert by_decay[1e-3] == {id(model[0].weight), id(fc.weight)}
    # One step from zero momentum: an adapted tensor moves by lr x trust x |w| / (|g| + wd |w|) x (g + wd w)
    # (x (1 + momentum) under Nesterov), a 1-D tensor by plain SGD's lr x g x (1 + momentum).
    x = torch.randn(4, 3, 8, 8)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    w, g = fc.weight.detach().clone(), fc.weight.grad.clone()
    b, gb = fc.bias.detach().clone(), fc.bias.grad.clone()
    opt.step()
    ratio = 0.01 * w.norm() / (g.norm() + 1e-3 * w.norm())
    assert torch.allclose(fc.weight.detach(), w - 1.9 * ratio * (g + 1e-3 * w), atol=1e-6)
    assert torch.allclose(fc.bias.detach(), b - 1.9 * gb, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lars_without_weight_decay_still_adapts_the_weights(momentum):
    """timm adapts only groups that have weight decay unless told to always adapt: at weight_decay=0 LARS was
    plain SGD at LARS's lr (lr 1.0: ~100x the step LARS means). The weights must step by the trust ratio."""
    model = _model()
    recipe = load_recipe(None, ["optim.name=lars", "optim.weight_decay=0", f"optim.momentum={momentum}",
                                "optim.trust_coeff=0.01"])
    opt = make_optimizer(model, recipe, lr=1.0)
    x = torch.randn(4, 3, 8, 8)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    fc = model[3]
    w, g, b, gb = fc.weight.detach().clone(), fc.weight.grad.clone(), fc.bias.detach().clone(), fc.bias.grad.clone()
    opt.step()
    nesterov = 1 + momentum  # the first Nesterov step from a zero buffer
    ratio = 0.01 * w.norm() / g.norm()
    lars_step, sgd_step = nesterov * ratio * g, nesterov * g
    assert torch.allclose(fc.weight.detach(), w - lars_step, atol=1e-6)
    assert (fc.weight.detach() - (w - sgd_step)).norm() > 0.5 * sgd_step.norm()  # far from the plain SGD step
    assert torch.allclose(fc.bias.detach(), b - nesterov * gb, atol=1e-6)  # 1-D tensors: plain SGD


def test_lars_settings_without_lars_and_lars_with_a_fused_kernel_are_refused():
    with pytest.raises(ConfigError, match="optim.trust_coeff and optim.trust_clip are LARS settings"):
        load_recipe(None, ["optim.trust_clip=true"])
    recipe = load_recipe(None, ["optim.name=lars", "speed.optimizer_impl=fused"])
    with pytest.raises(SetupError, match="no LARS kernel"):
        make_optimizer(_model(), recipe, lr=1.0)


def test_optimizer_state_is_put_where_torchs_loader_puts_it_after_deepspeeds_universal_load():
    """DeepSpeed's universal loader sets `step` as a CPU tensor; a fused or capturable kernel reads it through a
    device pointer, unchecked. A `meta` parameter stands in for a GPU one: the logic is the same on any device."""
    from alexdist.distributed.zero_universal import align_optimizer_state

    fused_p = torch.nn.Parameter(torch.empty(3, device="meta"))
    plain_p = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = torch.optim.AdamW([{"params": [fused_p]}, {"params": [plain_p]}], lr=1e-3, foreach=False)
    opt.param_groups[0]["fused"] = True  # as AdamW(fused=True) on CUDA
    for p in (fused_p, plain_p):
        opt.state[p] = {"step": torch.tensor(5.0, dtype=torch.float64), "exp_avg": torch.zeros(3, dtype=torch.float64)}
    align_optimizer_state(opt)
    fused, plain = opt.state[fused_p], opt.state[plain_p]
    assert fused["step"].device.type == "meta" and fused["step"].dtype == torch.float32
    assert plain["step"].device.type == "cpu"  # torch keeps a non-fused step on the host (its own rule)
    assert all(s["exp_avg"].device.type == "meta" and s["exp_avg"].dtype == torch.float32 for s in (fused, plain))
