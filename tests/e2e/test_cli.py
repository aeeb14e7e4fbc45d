"""The `alexdist` command as a user types it: help, version, typos, shipped recipes by name, progress in logs,
and a wheel installed without the repository."""

import subprocess
import sys

from helpers import ROOT, run_env


def _alexdist(*args, cwd=ROOT, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "alexdist", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_python_dash_m_alexdist_is_the_same_command():
    proc = _alexdist("--help")
    assert proc.returncode == 0 and "usage: alexdist COMMAND" in proc.stdout


def test_a_dashed_override_gets_a_hint_in_one_line(tmp_path):
    proc = _alexdist("train", "quickstart", "--train.epochs=5", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "alexdist: error: unknown option --train.epochs=5: overrides are key=value without dashes; write "
        "train.epochs=5"]


def test_an_unknown_recipe_name_lists_the_shipped_ones(tmp_path):
    proc = _alexdist("train", "bnn", cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "recipe 'bnn' not found; did you mean 'bn'?" in line and "quickstart" in line


def test_a_shipped_recipe_runs_by_name_from_any_directory_and_logs_progress_lines(tmp_path, cache_dir):
    # stdout is a pipe here, as in a Slurm log: progress comes as plain lines every train.log_every steps.
    proc = _alexdist("train", "quickstart", "train.max_steps=6", "train.log_every=3", "tracking.wandb=false",
                     f"output_dir={tmp_path / 'run'}", cwd=tmp_path, env=run_env(cache_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split("|")[0].strip() for line in lines] == ["step 3/528", "step 6/528"]
    assert all("loss" in line and "lr" in line and "img/s" in line and "ETA" in line for line in lines)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_an_installed_wheel_runs_the_quickstart_without_the_repository(tmp_path, cache_dir):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(wheels.glob("alexdist-*.whl"))
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = run_env(cache_dir, PYTHONPATH=str(site))  # ahead of the editable install of this checkout
    where = subprocess.run([sys.executable, "-c", "import alexdist; print(alexdist.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    proc = _alexdist("train", "quickstart", "train.max_steps=2", "tracking.wandb=false",
                     f"output_dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alexdist: done at step 2" in proc.stdout


