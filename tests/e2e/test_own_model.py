"""A model of your own, by import path (model.name=my_module:build): it trains, stops and resumes to the
uninterrupted run's weights under DDP and FSDP2 (sharded by the size rule, knowing nothing of the model), and
export, evaluate and predict rebuild it from the weights' metadata; torchvision's and timm's factories (which
take **kwargs) train, export and evaluate too. 2 CPU ranks on real digits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, check, launch, run_env, summary
from PIL import Image
from safetensors.torch import load_file

RUN = ["model.name=mymodels:Tiny", "train.epochs=2", "checkpoint.every_steps=10", "tracking.wandb=false",
       "train.log_every=5"]
STRATEGIES = {"ddp": [], "fsdp": ["distributed.strategy=fsdp"]}
LIBRARY_MODELS = {"torchvision": "torchvision.models:resnet18", "timm": "timm.models:resnet18"}


def _env(cache_dir, own_model_dir):
    return run_env(cache_dir, PYTHONPATH=str(own_model_dir))


def _alexdist(env, *args):
    proc = subprocess.run([sys.executable, "-m", "alexdist", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.learned
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_your_own_model_trains_resumes_and_exports(strategy, own_model_dir, tmp_path, cache_dir):
    env = _env(cache_dir, own_model_dir)
    whole, split = tmp_path / "whole", tmp_path / "split"
    extra = STRATEGIES[strategy]
    check(launch(RUN + extra + [f"output_dir={whole}"], cache_dir, nproc=2, env=env))
    check(launch(RUN + extra + ["train.max_steps=25", f"output_dir={split}"], cache_dir, nproc=2, env=env))
    check(launch(RUN + extra + [f"output_dir={split}"], cache_dir, nproc=2, env=env))
    assert summary(split)["resumed_at_step"] == 25 and summary(whole)["final_test_acc"] > 0.5  # it learns
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm statistics included

    def alexdist(*args):
        return _alexdist(env, *args)

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


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("library", LIBRARY_MODELS)
def test_a_torchvision_or_timm_model_trains_exports_and_evaluates(library, strategy, tmp_path, cache_dir):
    """resnet18 at 32 px, 2 steps: their factories take **kwargs and are sent num_classes alone."""
    env, run, name = run_env(cache_dir), tmp_path / "run", LIBRARY_MODELS[library]
    check(launch([f"model.name={name}", "train.max_steps=2", "checkpoint.every_steps=2", "tracking.wandb=false",
                  "train.log_every=2", f"output_dir={run}", *STRATEGIES[strategy]], cache_dir, nproc=2, env=env))
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    _alexdist(env, "export", str(ckpt), str(tmp_path / "exported.safetensors"))
    final, exported = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "exported.safetensors"))
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    result = json.loads(_alexdist(env, "evaluate", str(run / "model.safetensors"), "--json").strip().splitlines()[-1])
    assert result["model"] == name and result["test_acc"] == summary(run)["final_test_acc"]
