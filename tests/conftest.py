"""Shared helpers: launch real training runs (1 or 2 CPU processes) and read what they wrote, compare weights,
derive tolerances from a measured noise floor, and build a run in this process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from alexdist.distributed.launcher import launch_command as _launch_command
from alexdist.fileio import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One dataset cache for the session: digits are decoded once, later runs load the cache."""
    return tmp_path_factory.mktemp("alexdist-cache")


def run_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(
        ALEXDIST_CACHE=str(cache_dir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def launch_command(overrides: list[str], nproc: int = 1, launcher: str = "accelerate",
                   recipe: str = "recipes/quickstart.yaml", config_file: str | None = None) -> list[str]:
    """The command a user would type (see alexdist.launcher.launch_command), for `recipe` + overrides."""
    return _launch_command([recipe, *overrides], nproc, launcher, config_file)


def launch(overrides: list[str], cache_dir: Path, nproc: int = 1, launcher: str = "accelerate",
           recipe: str = "recipes/quickstart.yaml", env: dict[str, str] | None = None, timeout: int = 420,
           config_file: str | None = None) -> subprocess.CompletedProcess:
    """Run alexdist.train to completion through `launch_command`."""
    return subprocess.run(
        launch_command(overrides, nproc, launcher, recipe, config_file), cwd=ROOT, env=env or run_env(cache_dir),
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def wait_for_step(run_dir: Path, step: int, timeout: float = 240) -> None:
    """Block until metrics.jsonl records an optimizer step >= `step`."""
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.is_file() and any(e.get("step", 0) >= step for e in read_jsonl(path)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir} did not reach step {step} in {timeout} s")


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                                  f"STDERR:\n{proc.stderr[-4000:]}")
    return proc


WALL_CLOCK = {"time", "epoch_time_s", "images_per_s", "elapsed_s"}


def comparable_events(run_dir: Path) -> list[dict]:
    """metrics.jsonl without start/stop/reformed events and wall-clock fields: what must match between two runs."""
    return [{k: v for k, v in e.items() if k not in WALL_CLOCK} for e in read_jsonl(run_dir / "metrics.jsonl")
            if e["event"] not in ("start", "stop", "reformed")]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `alexdist: error:` line a failed run printed."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("alexdist: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# -- comparing trained weights -----------------------------------------------------------------------------

# A BatchNorm-free model (BN statistics depend on the per-process batch), no dropout (its masks depend on the
# rank): the conditions under which 2 ranks x B must equal 1 rank x 2B. Random images, not digits: the digits'
# flat background makes exact ties in max-pool windows that last-bit differences decide.
EQUIV = ["model.name=alexnet_3x3", "model.width_mult=0.25", "model.dropout=0", "train.max_steps=6",
         "optim.lr=0.02", "data.source=synthetic", "data.synthetic_train=2048", "data.synthetic_test=256",
         "schedule.warmup_frac=0", "tracking.wandb=false", "train.log_every=0"]
# In float64 the same training on other world sizes, accumulations or launchers agrees to ~1e-17 (measured
# 7e-18 on the 2-core Intel machine), whatever order the CPU's kernels sum in; a wrong gradient average, a
# missed micro-batch or an unsynchronised rank differs by >1e-4. The bound sits far from both.
FP64 = ["precision=fp64"]
FP64_BOUND = 1e-10


# Real digits, the BatchNorm model, 30 steps of 16 at a fixed lr: the training loss falls from 2.3 to about 1.6,
# so a run that does not train differs from one that does by far more than bf16's rounding can.
BF16_RUN = ["data.source=digits", "model.name=alexnet_bn", "model.width_mult=0.25", "model.dropout=0",
            "train.max_steps=30", "train.batch_size=16", "optim.ref_batch=null", "optim.lr=0.05",
            "schedule.name=constant", "schedule.warmup_frac=0", "train.log_every=1", "tracking.wandb=false"]


def trains_like(run: Path, reference: Path, tol: float = 0.1) -> bool:
    """Whether `run`'s mean training loss over its last 10 steps is within `tol` (relative) of `reference`'s."""
    def tail(r: Path) -> float:
        losses = [e["loss"] for e in read_jsonl(r / "metrics.jsonl") if e["event"] == "step"]
        assert len(losses) >= 20, r
        return sum(losses[-10:]) / 10

    return abs(tail(run) - tail(reference)) <= tol * tail(reference)


def flat(run_dir: Path, params_only: bool = False) -> torch.Tensor:
    """The final weights of a run as one float64 vector (names sorted); optionally parameters only."""
    from safetensors.torch import load_file

    sd = load_file(str(run_dir / "model.safetensors"))
    keys = sorted(k for k in sd if not params_only or not k.endswith(("running_mean", "running_var",
                                                                      "num_batches_tracked")))
    return torch.cat([sd[k].double().flatten() for k in keys])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def init_weights() -> torch.Tensor:
    """The initial weights of the EQUIV runs (train.seed 0)."""
    from alexdist.models import build_model

    torch.manual_seed(0)
    sd = build_model("alexnet_3x3", 32, 0.0, 0.25).state_dict()
    return torch.cat([sd[k].double().flatten() for k in sorted(sd)])


def assert_same_training(ref: torch.Tensor, other: torch.Tensor, name: str, bound: float = FP64_BOUND) -> None:
    moved = (ref - init_weights()).norm()
    assert moved / ref.norm() > 1e-4, "training barely moved the weights: the comparison would mean nothing"
    assert rel(ref, other) < bound, (name, rel(ref, other), bound)
    assert (ref - other).norm() < 1e-3 * moved, name  # differences are rounding, not a different update


def fp32_bound(fp32_run: torch.Tensor, fp64_run: torch.Tensor, factor: float = 3.0) -> float:
    """A tolerance for comparing two fp32 runs of the same training, derived on this machine: `factor` times
    how far this fp32 run is from the same training in float64 (its own rounding error, which depends on the
    CPU's kernels: 1.6e-6 for the EQUIV runs on the Intel machine). A correct fp32 variant (another strategy,
    a resume) is another rounding of the same computation, so it lies within a few such distances."""
    floor = rel(fp64_run, fp32_run)
    assert floor < 1e-3, f"fp32 and fp64 disagree by {floor:.1e}: the training is chaotic, nothing to compare"
    return factor * floor


# -- a run built in this process --------------------------------------------------------------------------

@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons: reset them around a test that builds its own Accelerator, and
    put back the signal handlers that a run installs."""
    from accelerate.state import AcceleratorState, GradientState

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for s, h in handlers.items():
        signal.signal(s, h)


def build_run(tmp_path: Path, monkeypatch, overrides: list[str]):
    """`training.setup.setup` of the quickstart recipe with `overrides`, in this process (one rank), ready to
    step."""
    from alexdist.config import load_recipe
    from alexdist.training.evaluation import EpochMeter
    from alexdist.training.setup import setup

    monkeypatch.setenv("ALEXDIST_CACHE", str(tmp_path / "cache"))
    run = setup(load_recipe("quickstart", [*overrides, "tracking.wandb=false", f"output_dir={tmp_path / 'run'}"]))
    run.meter = EpochMeter(run.accelerator.device)
    return run


def one_step(run, micro_batches, epoch: int = 0):
    """The loop's optimizer step and its bookkeeping, on the next step's micro-batches."""
    from alexdist.training.loop import record_step, train_step

    result = train_step(run, next(micro_batches), run.state.global_step + 1)
    record_step(run, result, epoch)
    return result


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line for the Slurm tests a plain run skips (no cluster answered), so a skip is never silent."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "slurm" in r.nodeid]
    if skipped:
        terminalreporter.write_line(
            f"alexdist: {len(skipped)} Slurm tests skipped: no Slurm cluster answered (start one with `bash "
            f"slurm/local/start_local_slurm.sh start --nodes 2`; .ci/run does, and sets ALEXDIST_REQUIRE_SLURM=2)")
