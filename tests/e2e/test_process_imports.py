"""What a training process imports: each launched process pays for every library it imports, and ~200 launches
make most of the suite's time. A process that compiles nothing does not import torch._dynamo (~1.2 s, with sympy,
pandas and scikit-learn) unless DDP or FSDP2 needs it, nor DeepSpeed (0.2 s) outside a ZeRO run; the optimizer
that skips torch._dynamo updates the weights exactly as torch's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT, WITH_TRACKING, check, import_probe_env, imported, launch_command

SMALL = ["data.source=synthetic", "data.synthetic_train=256", "data.synthetic_test=64", "train.batch_size=32",
         "train.epochs=1", "train.max_steps=3", "checkpoint.every_steps=2", "tracking.wandb=false",
         "model.width_mult=0.25"]

# A fresh interpreter: optimizers from the recipe (speed.compile off), stepped, then the same optimizers as torch
# builds them (speed.compile on: torch's own methods, torch._dynamo imported by them) on the same gradients.
OPTIMIZERS = """
import importlib, json, sys
import torch
from alexdist.config import load_recipe
from alexdist.training.optim import make_optimizer

def run(name, compile_on, import_dynamo_at=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))
    start = [p.detach().clone() for p in model.parameters()]
    recipe = load_recipe("quickstart", [f"optim.name={name}", f"speed.compile={compile_on}", "optim.weight_decay=0.01"])
    opt = make_optimizer(model, recipe, lr=0.05)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    for i in range(4):
        if i == import_dynamo_at:
            importlib.import_module("torch._dynamo")  # as a later torch.compile would: torch's methods from here
        torch.manual_seed(100 + i)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        opt.zero_grad()
    assert len(calls) == 4, calls  # torch's step hooks still run
    params = [p.detach().clone() for p in model.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(start, params))  # every tensor was updated
    return params + [t for s in opt.state_dict()["state"].values() for t in s.values()]

def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

eager = {name: run(name, False) for name in ("sgd", "adamw")}
out = {"dynamo_imported": "torch._dynamo" in sys.modules}
midway = run("sgd", False, import_dynamo_at=2)
torch_own = {name: run(name, True) for name in ("sgd", "adamw")}
out.update(sgd_same=same(eager["sgd"], torch_own["sgd"]), adamw_same=same(eager["adamw"], torch_own["adamw"]),
           midway_same=same(midway, torch_own["sgd"]))
print("REPORT " + json.dumps(out))
"""


def test_an_optimizer_in_a_process_that_compiles_nothing_skips_torch_dynamo_and_updates_like_torchs():
    proc = subprocess.run([sys.executable, "-c", OPTIMIZERS], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("REPORT ")).removeprefix("REPORT "))
    assert report["dynamo_imported"] is False  # built, stepped, zeroed, state read: no torch._dynamo
    assert report["sgd_same"] and report["adamw_same"], report  # parameters and optimizer state, bit for bit
    assert report["midway_same"], report  # torch._dynamo imported after two steps: torch's own methods from then


def test_one_training_process_imports_neither_torch_dynamo_nor_deepspeed(tmp_path, cache_dir):
    """Trained, evaluated, checkpointed, weights saved. (Two processes: DDP's constructor imports torch._dynamo
    itself; test_smoke.py checks that only ZeRO imports DeepSpeed.)"""
    log = tmp_path / "imports"
    env = import_probe_env(cache_dir, log, ["torch._dynamo", "deepspeed", "alexdist.training.loop"])
    cmd = launch_command(SMALL + WITH_TRACKING + [f"output_dir={tmp_path / 'run'}"], 1)  # as a user runs it
    check(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420, check=False))
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert imported(log) == {"alexdist.training.loop": 1}  # the probe sees the training process, and only that
