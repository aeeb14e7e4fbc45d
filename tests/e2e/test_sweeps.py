"""The shipped W&B sweep: W&B's own agent code expands its command (no server: the agent's run command is fed
the way the server would feed it), and the expanded command trains for a few steps offline as a sweep trial."""

import os
import sys
from pathlib import Path

import yaml
from helpers import ROOT, check, run_env, summary

SWEEP = ROOT / "recipes" / "sweeps" / "bn.yaml"


def expand_with_wandb_agent(sweep: dict, values: dict, run_id: str, tmp_path: Path, monkeypatch) -> list[str]:
    """The command line `wandb agent` would start for one trial with `values`."""
    from wandb import wandb_agent

    started = []

    class Captured:
        def __init__(self, command=None, env=None, **_):
            started.append((command, env))

    monkeypatch.setattr(wandb_agent, "AgentProcess", Captured)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw3ep")
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sw3ep")
    agent._sweep_command = sweep["command"]
    agent._command_run({"run_id": run_id, "program": sweep["program"],
                        "args": {k: {"value": v} for k, v in values.items()}})
    (command, env), = started
    return command, env


def test_the_sweep_definition_is_one_wandb_accepts():
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["metric"] == {"name": "val/acc", "goal": "maximize"}  # what selects: the validation split's
    assert sweep["command"][:5] == ["accelerate", "launch", "-m", "alexdist.train", "recipes/bn.yaml"]
    assert "${args_no_hyphens}" in sweep["command"]
    from alexdist.config import load_recipe

    for key, spec in sweep["parameters"].items():  # every swept key is a recipe key, and every value valid
        for value in spec.get("values", [spec.get("min"), spec.get("max")]):
            load_recipe("bn", [f"{key}={value}"])


def test_a_sweep_trial_expanded_by_the_wandb_agent_trains_offline(tmp_path, cache_dir, monkeypatch):
    sweep = yaml.safe_load(SWEEP.read_text())
    values = {"optim.lr": 0.05, "optim.weight_decay": 0.001, "train.batch_size": 64, "train.label_smoothing": 0.1}
    command, env = expand_with_wandb_agent(sweep, values, "trial01", tmp_path, monkeypatch)
    assert command == ["accelerate", "launch", "-m", "alexdist.train", "recipes/bn.yaml", "optim.lr=0.05",
                       "optim.weight_decay=0.001", "train.batch_size=64", "train.label_smoothing=0.1"]
    assert env["WANDB_RUN_ID"] == "trial01"
    # The expanded command as the agent would run it, on this machine's data and size (appended overrides).
    small = ["data.source=synthetic", "data.synthetic_train=256", "data.synthetic_test=64", "model.width_mult=0.25",
             "train.max_steps=2", f"output_dir={tmp_path / 'runs'}", "data.cache_dir=null"]
    trial_env = run_env(cache_dir, WANDB_SWEEP_ID="sw3ep", WANDB_RUN_ID="trial01",
                        WANDB_SWEEP_PARAM_PATH=env["WANDB_SWEEP_PARAM_PATH"], WANDB_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *command[2:], *small]
    import subprocess

    check(subprocess.run(cmd, cwd=ROOT, env=trial_env, capture_output=True, text=True, timeout=300, check=False))
    run = tmp_path / "runs" / "sweep-sw3ep" / "trial01"  # its own directory: trials never resume each other
    s = summary(run)
    assert s["wandb_run_id"] == "trial01" and s["steps"] == 2  # the W&B run the agent created
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.05 and saved["train"]["batch_size"] == 64  # the sampled values trained
    assert saved["train"]["label_smoothing"] == 0.1 and saved["optim"]["weight_decay"] == 0.001
    assert os.path.isdir(run / "wandb")  # the offline W&B run, to `wandb sync` later
