"""What a run prints besides its own progress: nothing from libraries it does not use, and notices only where
they matter."""

import importlib.util

import pytest
from helpers import check, launch

NOISE_NOTICE = "the gradient noise scale is not measured"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_a_ddp_run_on_cpus_prints_nothing_from_deepspeed(tmp_path, cache_dir):
    """Accelerate imports DeepSpeed whenever it is installed, and that import warned "Setting accelerator to CPU"
    once per process."""
    proc = check(launch(["train.max_steps=2", "tracking.wandb=false", f"output_dir={tmp_path / 'run'}"], cache_dir,
                        nproc=2))
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
    assert "DeepSpeed" not in proc.stdout + proc.stderr


def test_a_one_process_run_says_why_the_noise_scale_is_not_measured_only_when_the_recipe_asks_for_it(
        tmp_path, cache_dir):
    """tracking.noise_scale is on by default and cannot be measured with one process and no accumulation: a
    default run stays quiet about it; a recipe that sets it is told why, once."""
    common = ["train.max_steps=2", "tracking.wandb=false"]
    default = check(launch([*common, f"output_dir={tmp_path / 'default'}"], cache_dir))
    assert NOISE_NOTICE not in default.stdout + default.stderr
    assert "Setting accelerator to CPU" not in default.stdout + default.stderr
    asked = check(launch([*common, "tracking.noise_scale=true", f"output_dir={tmp_path / 'asked'}"], cache_dir))
    assert (asked.stdout + asked.stderr).count(NOISE_NOTICE) == 1
