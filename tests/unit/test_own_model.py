"""A model of your own, by import path (model.name=my_module:build): it trains, stops and resumes to the
uninterrupted run's weights under DDP and FSDP2 (sharded by the size rule, knowing nothing of the model), and
export, evaluate and predict rebuild it from the weights' metadata. 2 CPU ranks on real digits."""

from __future__ import annotations

import pytest

from alexdist.config import load_recipe
from alexdist.distributed.fsdp import UNIT_PARAMS, sharding_units
from alexdist.errors import ConfigError, SetupError
from alexdist.models import build_model


def test_an_import_path_builds_the_model_with_the_arguments_it_takes(own_model_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(own_model_dir))
    model = build_model("mymodels:Tiny", None, 0.5, 0.25, num_classes=7)
    assert type(model).__name__ == "Tiny" and model.head[-1].out_features == 7 and model.input_size == 32
    assert [type(u).__name__ for u in sharding_units(model)] == ["Linear"]  # the 131k-parameter layer alone
    assert sum(p.numel() for p in model.head[1].parameters()) >= UNIT_PARAMS
    load_recipe("quickstart", ["model.name=mymodels:Tiny"])  # accepted without importing anything
    with pytest.raises(ConfigError, match="cannot import no_such_module"):
        build_model("no_such_module:net", num_classes=10)
    with pytest.raises(ConfigError, match="has no callable 'Nope'"):
        build_model("mymodels:Nope", num_classes=10)


def test_tied_weights_across_sharding_units_are_refused_in_one_line():
    import torch.nn as nn

    shared = nn.Linear(512, 512)  # 262k parameters, in two units
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    with pytest.raises(SetupError, match="shared with another part of the model"):
        sharding_units(model)


def test_a_factory_is_sent_only_the_arguments_its_signature_names_not_those_its_kwargs_would_take(monkeypatch):
    import sys
    import types

    import torch.nn as nn

    sent = {}

    def only_kwargs(**kwargs):  # as torchvision's and timm's: **kwargs goes on to a class that may refuse it
        sent["only_kwargs"] = kwargs
        return nn.Linear(2, kwargs["num_classes"])

    def some_named(num_classes, *, dropout=0.1, **kwargs):
        sent["some_named"] = {"num_classes": num_classes, "dropout": dropout, **kwargs}
        return nn.Linear(2, num_classes)

    monkeypatch.setitem(sys.modules, "factories", types.SimpleNamespace(only_kwargs=only_kwargs,
                                                                        some_named=some_named))
    build_model("factories:only_kwargs", 32, 0.5, 1.0, num_classes=7)
    build_model("factories:some_named", 32, 0.5, 1.0, num_classes=7)
    assert sent == {"only_kwargs": {"num_classes": 7}, "some_named": {"num_classes": 7, "dropout": 0.5}}
    assert build_model("torchvision.models:resnet18", 32, 0.5, 1.0, num_classes=7).fc.out_features == 7
    assert build_model("timm.models:resnet18", 32, 0.5, 1.0, num_classes=7).fc.out_features == 7
