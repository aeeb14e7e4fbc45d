"""A Hub dataset without a network: the run stops in one line that says how to use a local copy."""

import subprocess
import sys

from helpers import ROOT, run_env

N_TRAIN, N_TEST = 50, 20  # 5 torchvision batches of 10


def test_hub_dataset_without_network_says_how_to_use_a_local_copy(tmp_path):
    env = run_env(tmp_path / "cache")
    out = subprocess.run(
        [sys.executable, "-m", "alexdist.train", "recipes/bn.yaml", f"output_dir={tmp_path / 'run'}",
         "tracking.wandb=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 3
    err = [line for line in out.stderr.splitlines() if line.startswith("alexdist: error:")]
    assert len(err) == 1, out.stderr[-2000:]
    assert "uoft-cs/cifar10" in err[0] and "hf download" in err[0] and "data.source=DIR" in err[0]
    assert "Traceback" not in out.stderr


