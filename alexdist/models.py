"""The three models of the student's report (docs/report.md) and the LARS paper's AlexNet-BN, in a registry by name.

- `alexnet`: Krizhevsky et al. 2012 as one tower (96-256-384-384-256 convs, LRN, overlapping 3x3/2 pools,
  4096-4096 classifier) with a 10-way head. At 227 px: 58,322,314 parameters (the report's "about 58.1 M").
- `alexnet_3x3`: the report's change #1, every conv replaced by a pair of 3x3 convs. The report gives no widths;
  we use 64-256-384-384-256 (AlexNet's, with the full-resolution first pair at 64 because it is the costliest
  layer), the report's pools (3x3/2 then 2x2), a 3x3 adaptive average pool and a 2048-2048 classifier:
  16,056,650 parameters, at any input size (the report's "about 15.9 M").
- `alexnet_bn`: the report's change #2, 3x3 convs with BatchNorm in blocks of 2-2-2-3-3 with VGG widths
  64-128-256-512-512, 3x3/2 max pools and a 512-512 classifier (as the VGG-BN nets that reach 94 % on CIFAR-10).
- `alexnet_bn_lars2017`: not the report's: You, Gitman and Ginsburg 2017's AlexNet-BN (arXiv 1708.03888, the
  LARS paper, 60.1 % top-1 on ImageNet at batch 8K), i.e. `alexnet` with BatchNorm after each of its five convs
  in place of LRN (conv -> BN -> ReLU, the convs without bias: BN's shift replaces it). The paper describes the
  net in one sentence; the BN's place before the ReLU, the biases and the dropout kept in the classifier follow
  common practice, not the paper. At 227 px with 1000 classes: 62,379,720 parameters (`alexnet`: 62,378,344).
  Named for its paper because `alexnet_bn` is already the report's 3x3 net; torchvision's AlexNet (other widths,
  no LRN) is not in the registry: a recipe names it by import path, `torchvision.models:alexnet`.

Every model ends in an adaptive average pool, so its parameter count does not depend on the input size and
weights move between 32 px and 227 px runs. At 32 px AlexNet's 11x11 stem runs at stride 1 (padding 5): the
stride-4 stem would shrink a CIFAR image to 7 px before the first pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10


def _w(c: int, mult: float) -> int:
    return max(8, round(c * mult))


def _classifier(in_features: int, hidden: int, dropout: float, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class AlexNet(nn.Module):
    """`batch_norm=False`: Krizhevsky's (LRN after the first two convs); True: BatchNorm after every conv, no LRN."""

    def __init__(self, input_size: int = 227, dropout: float = 0.5, width_mult: float = 1.0,
                 num_classes: int = NUM_CLASSES, batch_norm: bool = False):
        super().__init__()
        c1, c2, c3, c4, c5 = (_w(c, width_mult) for c in (96, 256, 384, 384, 256))
        stride, pad = (4, 0) if input_size >= 128 else (1, 5)

        def conv(cin: int, cout: int, k: int, lrn: bool = False, **kw) -> list[nn.Module]:
            if batch_norm:
                return [nn.Conv2d(cin, cout, k, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            norm = [nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)] if lrn else []
            return [nn.Conv2d(cin, cout, k, **kw), nn.ReLU(inplace=True), *norm]

        self.features = nn.Sequential(
            *conv(3, c1, 11, lrn=True, stride=stride, padding=pad), nn.MaxPool2d(3, 2),
            *conv(c1, c2, 5, lrn=True, padding=2), nn.MaxPool2d(3, 2),
            *conv(c2, c3, 3, padding=1), *conv(c3, c4, 3, padding=1), *conv(c4, c5, 3, padding=1),
            nn.MaxPool2d(3, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(6)  # identity at 227 px (6x6 maps), as in torchvision
        self.classifier = _classifier(c5 * 36, _w(4096, width_mult), dropout, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def _conv3x3(cin: int, cout: int, bn: bool) -> list[nn.Module]:
    if bn:  # no bias: BatchNorm's shift makes it redundant
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]


class AlexNet3x3(nn.Module):
    def __init__(self, input_size: int = 32, dropout: float = 0.5, width_mult: float = 1.0,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        widths = [_w(c, width_mult) for c in (64, 256, 384, 384, 256)]
        layers: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(widths):
            layers += _conv3x3(cin, c, False) + _conv3x3(c, c, False)
            layers.append(nn.MaxPool2d(3, 2, padding=1) if i == 0 else nn.MaxPool2d(2))
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.classifier = _classifier(cin * 9, _w(2048, width_mult), dropout, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class AlexNetBN(nn.Module):
    def __init__(self, input_size: int = 32, dropout: float = 0.5, width_mult: float = 1.0,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        blocks = [(64, 2), (128, 2), (256, 2), (512, 3), (512, 3)]
        layers: list[nn.Module] = []
        cin = 3
        for c, n in blocks:
            c = _w(c, width_mult)
            for _ in range(n):
                layers += _conv3x3(cin, c, True)
                cin = c
            layers.append(nn.MaxPool2d(3, 2, padding=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = _classifier(cin, _w(512, width_mult), dropout, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@dataclass(frozen=True)
class ModelSpec:
    cls: Callable[..., nn.Module]
    default_input_size: int
    summary: str


MODELS: dict[str, ModelSpec] = {
    "alexnet": ModelSpec(AlexNet, 227, "original AlexNet: 11x11/4 stem, LRN, 3x3/2 pools, 4096-4096 FC"),
    "alexnet_3x3": ModelSpec(AlexNet3x3, 32, "student's report, change #1: pairs of 3x3 convs, 2048-2048 FC"),
    "alexnet_bn": ModelSpec(AlexNetBN, 32,
                            "student's report, change #2: 3x3 convs + BatchNorm (2-2-2-3-3), 512-512 FC"),
    "alexnet_bn_lars2017": ModelSpec(partial(AlexNet, batch_norm=True), 227,
                                     "You et al. 2017's AlexNet-BN (LARS paper): alexnet, BatchNorm for LRN"),
}


def init_weights(model: nn.Module) -> None:
    """He (fan-out) initialisation for the convs, as torchvision's VGG; PyTorch's default for the linears (VGG's
    N(0, 0.01) slows the start of the BN model by several epochs). PyTorch's default conv init shrinks the signal
    through deep plain ReLU stacks: with it the 10-conv alexnet_3x3 stays at chance accuracy."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def is_import_path(name: str) -> bool:
    """Whether model.name names a model of your own ('my_pkg.models:build') rather than one of the registry."""
    return ":" in name


def import_model(path: str) -> Callable[..., nn.Module]:
    """The callable an import path names ('package.module:attribute'); ConfigError in one line if there is none."""
    import importlib

    from alexdist.errors import ConfigError

    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.name '{path}': cannot import {module_name} ({exc}); put its folder on PYTHONPATH "
                          f"or install it (every process, on every node, must import it)") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model.name '{path}': {module_name} has no callable '{attr}'; give "
                          f"'module:function' of a function or class that returns an nn.Module")
    return factory


def build_model(name: str, input_size: int | None = None, dropout: float = 0.5, width_mult: float = 1.0,
                num_classes: int = NUM_CLASSES) -> nn.Module:
    """Build a model: one of the registry (`input_size=None` uses its default: 227 for alexnet, else 32), or your
    own by import path, called with num_classes (and input_size, dropout, width_mult where its signature names
    them: `**kwargs` gets num_classes alone); the head has one output per class of the data (10 for CIFAR-10)."""
    if is_import_path(name):
        return _build_imported(name, resolve_input_size(name, input_size), dropout, width_mult, num_classes)
    spec = MODELS[name]
    size = input_size or spec.default_input_size
    model = spec.cls(input_size=size, dropout=dropout, width_mult=width_mult, num_classes=num_classes)
    init_weights(model)
    return model


def _build_imported(path: str, input_size: int, dropout: float, width_mult: float, num_classes: int) -> nn.Module:
    from alexdist.errors import ConfigError

    factory = import_model(path)
    offered = {"input_size": input_size, "dropout": dropout, "width_mult": width_mult}
    model = factory(num_classes=num_classes, **{k: v for k, v in offered.items() if k in declared_arguments(factory)})
    if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
        raise ConfigError(f"model.name '{path}' returned {type(model).__name__}, not an nn.Module with parameters")
    return model


def declared_arguments(factory: Callable[..., nn.Module]) -> set[str]:
    """The keyword arguments a factory names in its signature. A `**kwargs` catch-all is not one: torchvision's and
    timm's factories pass it on to the model's class, which refuses an input_size it never declared."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C extension without a signature: num_classes only
        return set()
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in keyword}


def resolve_input_size(name: str, input_size: int | None) -> int:
    """The input side a model gets: model.input_size, else the registry model's default (32 for your own)."""
    return input_size or (32 if is_import_path(name) else MODELS[name].default_input_size)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module, input_size: int) -> int:
    """Forward FLOPs for one image (2 x multiply-adds of convs and linears), counted by torch itself."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    model.train(was_training)
    return counter.get_total_flops()


def describe_models(input_size: int | None = None) -> list[dict]:
    """One row per registered model: name, input size, parameters, forward GFLOPs per image."""
    rows = []
    for name, spec in MODELS.items():
        size = input_size or spec.default_input_size
        model = build_model(name, size)
        rows.append(
            {
                "name": name,
                "input_size": size,
                "params": count_params(model),
                "gflops": flops_per_image(model, size) / 1e9,
                "summary": spec.summary,
            }
        )
    return rows


# -- BatchNorm in fp32 under half precision (airbench keeps BatchNorm in fp32 too) ----------------------

class FP32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that computes in fp32, whatever the dtype of its input and of its own weights.

    Under autocast (fp16/bf16 with DDP) half-precision batch statistics lose the small variances of late layers;
    under DeepSpeed's fp16/bf16 the engine casts BatchNorm's weights but not its running statistics, and plain
    BatchNorm then fails on the mixed dtypes. Here the statistics stay fp32, the weights are used as fp32 (their
    gradients flow back to whatever dtype they have), and the output returns in the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64):
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        keep = not self.training or self.track_running_stats
        with torch.autocast(x.device.type, enabled=False):
            out = F.batch_norm(
                x.float(), self.running_mean if keep else None, self.running_var if keep else None,
                self.weight.float(), self.bias.float(), use_batch, momentum, self.eps,
            )
        return out.to(x.dtype)


def keep_batchnorm_fp32(model: nn.Module) -> nn.Module:
    """Make every BatchNorm2d an FP32BatchNorm2d in place (same parameters and state dict keys)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = FP32BatchNorm2d
    return model


def restore_fp32_buffers(model: nn.Module) -> int:
    """Cast 16-bit floating buffers (BatchNorm running statistics) back to fp32; returns how many were cast.

    For DeepSpeed < 0.19.2, whose engine casts the whole module to 16 bit; a no-op on later versions.
    """
    n = 0
    for m in model.modules():
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.dtype in (torch.float16, torch.bfloat16):
                setattr(m, name, b.float())
                n += 1
    return n
