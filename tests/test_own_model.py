"""A model of your own, by import path (model.name=my_module:build): it trains, stops and resumes to the
uninterrupted run's weights under DDP and FSDP2 (sharded by the size rule, knowing nothing of the model), and
export, evaluate and predict rebuild it from the weights' metadata. 2 CPU ranks on real digits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, check, launch, run_env, summary
from PIL import Image
from safetensors.torch import load_file

from alexdist.config import load_recipe
from alexdist.distributed.fsdp import UNIT_PARAMS, sharding_units
from alexdist.errors import ConfigError, SetupError
from alexdist.models import build_model

pytestmark = pytest.mark.slow

MODULE = '''
import torch.nn as nn


class Tiny(nn.Module):
    """A body of two BatchNorm convs and a head whose first linear (131k parameters) is a sharding unit."""

    def __init__(self, num_classes, input_size=32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))
        self.input_size = input_size

    def forward(self, x):
        return self.head(self.body(x))
'''
RUN = ["model.name=mymodels:Tiny", "train.epochs=2", "checkpoint.every_steps=10", "tracking.wandb=false",
       "train.log_every=5"]
STRATEGIES = {"ddp": [], "fsdp": ["distributed.strategy=fsdp"]}


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("own-model")
    (d / "mymodels.py").write_text(MODULE)
    return d


def _env(cache_dir, module_dir):
    return run_env(cache_dir, PYTHONPATH=str(module_dir))


def test_an_import_path_builds_the_model_with_the_arguments_it_takes(module_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(module_dir))
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


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_your_own_model_trains_resumes_and_exports(strategy, module_dir, tmp_path, cache_dir):
    env = _env(cache_dir, module_dir)
    whole, split = tmp_path / "whole", tmp_path / "split"
    extra = STRATEGIES[strategy]
    check(launch(RUN + extra + [f"output_dir={whole}"], cache_dir, nproc=2, env=env))
    check(launch(RUN + extra + ["train.max_steps=25", f"output_dir={split}"], cache_dir, nproc=2, env=env))
    check(launch(RUN + extra + [f"output_dir={split}"], cache_dir, nproc=2, env=env))
    assert summary(split)["resumed_at_step"] == 25 and summary(whole)["final_test_acc"] > 0.5  # it learns
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm statistics included

    def alexdist(*args):
        proc = subprocess.run([sys.executable, "-m", "alexdist", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    ckpt = sorted((split / "checkpoints").glob("step-*"))[-1]
    alexdist("export", str(ckpt), str(tmp_path / "exported.safetensors"))
    exported = load_file(str(tmp_path / "exported.safetensors"))
    assert all(torch.equal(exported[k], a[k]) for k in a)  # the checkpoint's model is the final one
    result = json.loads(alexdist("evaluate", str(whole / "model.safetensors"), "--json").strip().splitlines()[-1])
    assert result["test_acc"] == summary(whole)["final_test_acc"] and result["model"] == "mymodels:Tiny"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(tmp_path / "x.png")
    top = json.loads(alexdist("predict", str(tmp_path / "x.png"), "--weights", str(whole), "--json")
                     .strip().splitlines()[-1])["top"]
    assert top and top[0]["class"] in [str(i) for i in range(10)]
