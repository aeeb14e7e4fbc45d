"""Helpers the tests share: launch real training runs (1 or 2 CPU processes) and read what they wrote, compare
weights, derive tolerances from a measured noise floor, and build a run in this process. Fixtures live in
conftest.py; this module is plain functions, imported as `helpers` (conftest puts tests/ on the path)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from alexdist.distributed.launcher import launch_command as _launch_command
from alexdist.fileio import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


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


def import_probe_env(cache_dir: Path, log: Path, watch: list[str]) -> dict[str, str]:
    """run_env for a launch whose every process (launcher and ranks) appends to `log` each module of `watch` it
    imports (tests/workers/import_probe/sitecustomize.py); read back with `imported`."""
    probe = str(ROOT / "tests" / "workers" / "import_probe")
    return run_env(cache_dir, PYTHONPATH=os.pathsep.join(filter(None, [probe, os.environ.get("PYTHONPATH")])),
                   ALEXDIST_IMPORT_WATCH=",".join(watch), ALEXDIST_IMPORT_LOG=str(log))


def imported(log: Path) -> dict[str, int]:
    """How many processes imported each watched module (import_probe_env)."""
    rows = [line.split() for line in log.read_text().splitlines()] if log.is_file() else []
    return {module: len({pid for pid, m in rows if m == module}) for module in {m for _, m in rows}}


# Off in launched test runs unless a test turns them on (its overrides come after, and the last one wins): W&B's
# offline run and the confusion matrix's PNG cost each main process about a CPU second apiece, over some 200
# launches, and only the tests that check them (test_quickstart, test_compare, test_trackers, test_resume,
# test_evaluation_features) read what they write; test_process_imports turns them on to probe their imports.
QUIET_TRACKING = ["tracking.wandb=false", "eval.confusion_png=false"]
WITH_TRACKING = ["tracking.wandb=true", "eval.confusion_png=true"]


def launch_command(overrides: list[str], nproc: int = 1, launcher: str = "accelerate",
                   recipe: str = "recipes/quickstart.yaml", config_file: str | None = None) -> list[str]:
    """The command a user would type (see alexdist.distributed.launcher.launch_command), for `recipe` + overrides
    (after QUIET_TRACKING)."""
    return _launch_command([recipe, *QUIET_TRACKING, *overrides], nproc, launcher, config_file)


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


def worker_report(script: str, *args: str, nproc: int = 2, env: dict[str, str] | None = None) -> dict:
    """Run tests/workers/SCRIPT under `torchrun --nproc_per_node NPROC` (a worker that builds what it tests itself) and
    return the JSON its rank 0 printed on a `REPORT ` line."""
    from alexdist.distributed.launcher import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(ROOT / "tests" / "workers" / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or {**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=400, check=False)
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[0].removeprefix("REPORT "))


def plain_and_sharded(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """For the FSDP2 workers (a process group formed): a registry model in float64 (seed 0) and a copy of it
    sharded by alexdist's FSDP2, with the same initial weights."""
    from alexdist.distributed.fsdp import shard_model
    from alexdist.models import build_model

    torch.manual_seed(0)
    plain = build_model(name, 32, 0.0, 0.25).double()
    model = build_model(name, 32, 0.0, 0.25).double()
    model.load_state_dict(plain.state_dict())
    return plain, shard_model(model, "fp64")


def unshare_refusal() -> str | None:
    """Why a PID namespace (`unshare --pid --fork --mount-proc`, a container's view: the launcher is PID 1) cannot
    be made on this machine; None when it can."""
    import shutil

    if shutil.which("unshare") is None:
        return "unshare(1) is not installed (util-linux)"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True,
                           check=False)
    return None if probe.returncode == 0 else f"unshare --pid is not permitted here ({probe.stderr.strip()[:80]})"


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
# EQUIV as 2 ranks x 4 x accumulation 2 with clipping active: what FSDP2 and ZeRO are compared with DDP on
# (conftest.ddp_fp64 trains it once for both).
EQUIV_ACCUM_CLIP = EQUIV + ["train.batch_size=4", "train.grad_accum=2", "train.grad_clip=0.2"]


# Real digits trained to a converged test accuracy: the BatchNorm model at x0.125, 5 epochs of 32 (220 steps),
# one-cycle lr 0.05. Variants that must train alike (bf16, bf16 BatchNorm, FSDP/ZeRO in bf16) are compared with
# fp32 in points of test accuracy, within a tolerance measured in the same session from fp32 runs that differ
# only in their seed (accuracy_band). Measured on the 2-core AMD EPYC (AVX2, bf16 emulated in software):
# fp32 seeds 0/1/2 reach 96.9 / 98.1 / 97.2 %, bf16 97.2 %; the control (lr 1e-6) stays near chance (~10 %).
DIGITS_RUN = ["data.source=digits", "model.name=alexnet_bn", "model.width_mult=0.125", "model.dropout=0",
              "train.epochs=5", "train.batch_size=32", "optim.ref_batch=null", "optim.lr=0.05",
              "tracking.wandb=false", "train.log_every=10"]
DIGITS_SEEDS = (0, 1, 2)
DIGITS_CONTROL = ["optim.lr=1e-6"]  # a run that does not train: must fail the comparison by a wide margin


def final_accuracy(run: Path) -> tuple[float, int]:
    """The run's final test accuracy and the number of test images it was measured on."""
    last = [e for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "test"][-1]
    return last["acc"], sum(map(sum, last["confusion"]))


@dataclass
class AccuracyBand:
    """Where fp32 runs of DIGITS_RUN land on this machine: their mean final test accuracy, and the tolerance for
    "trains like fp32": 4 x the larger of the seeds' standard deviation and the test set's own sampling error
    (sqrt(p(1-p)/n): 0.9 points for 359 images at 97 %), so that three seeds that happen to agree cannot shrink it
    below what the test set can resolve."""

    accs: list[float]
    n_test: int

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def tol(self) -> float:
        sampling = math.sqrt(self.mean * (1 - self.mean) / self.n_test)
        return 4 * max(statistics.stdev(self.accs), sampling)

    def off_by(self, run: Path) -> float:
        """How far `run`'s final test accuracy is from the fp32 mean, in units of the tolerance."""
        return abs(final_accuracy(run)[0] - self.mean) / self.tol

    def describe(self, run: Path) -> str:
        return (f"{run.name}: {final_accuracy(run)[0]:.4f} vs fp32 {self.mean:.4f} +- {self.tol:.4f} "
                f"(seeds {', '.join(f'{a:.4f}' for a in self.accs)})")


def trains_like_fp32(band: AccuracyBand, run: Path, control: Path) -> None:
    """Assert that `run` lands within the fp32 band, and that the control misses it by several tolerances (the
    check has teeth on this machine, measured in the same session)."""
    assert band.off_by(control) > 5, f"the control is too close: {band.describe(control)}"
    assert band.off_by(run) <= 1, band.describe(run)


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


def build_run(tmp_path: Path, monkeypatch, overrides: list[str]):
    """`training.setup.setup` of the quickstart recipe with `overrides`, in this process (one rank), ready to
    step."""
    from alexdist.config import load_recipe
    from alexdist.training.build_run import build_run
    from alexdist.training.evaluation import EpochMeter

    monkeypatch.setenv("ALEXDIST_CACHE", str(tmp_path / "cache"))
    run = build_run(load_recipe("quickstart", [*overrides, "tracking.wandb=false", f"output_dir={tmp_path / 'run'}"]))
    run.meter = EpochMeter(run.accelerator.device)
    return run


def one_step(run, micro_batches, epoch: int = 0):
    """The loop's optimizer step and its bookkeeping, on the next step's micro-batches."""
    from alexdist.training.loop import record_step, train_step

    result = train_step(run, next(micro_batches), run.state.global_step + 1)
    record_step(run, result, epoch)
    return result


@contextmanager
def in_this_process(threads: int | None = None, **env: str) -> Iterator[None]:
    """Runs trained in this process (one rank, no process group; `train_here`), with the process-wide state they
    touch put back after: Accelerate's singletons, the signal handlers, torch's thread count (`threads`: e.g. 1, as
    a launched rank has) and the environment variables given (e.g. ALEXDIST_CACHE=...)."""
    import signal

    from accelerate.state import AcceleratorState, GradientState

    from alexdist import faults

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    saved_env, saved_threads = {k: os.environ.get(k) for k in env}, torch.get_num_threads()
    os.environ.update(env)
    if threads:
        torch.set_num_threads(threads)
    faults._active.cache_clear()  # ALEXDIST_FAULT is read once per process: these runs are several
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        for s, h in handlers.items():
            signal.signal(s, h)
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        faults._active.cache_clear()


def train_here(recipe: str, overrides: list[str]) -> dict:
    """One run in this process (inside `in_this_process`), from a fresh Accelerate state; its summary."""
    from accelerate.state import AcceleratorState, GradientState

    from alexdist.config import load_recipe
    from alexdist.training.loop import train

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train(load_recipe(recipe, overrides))


def fake_study_launcher(tmp_path: Path, monkeypatch, script: str) -> list[list[str]]:
    """benchmarks/recipes.py launching `script` (a stand-in for the launcher and its ranks) instead of training,
    its results and runs under tmp_path; the launches' arguments, in order, as they happen."""
    import recipes

    path = tmp_path / "fake_launch.py"
    path.write_text(script)
    launches = []

    def fake(args, nproc, launcher):
        launches.append(args)
        return [sys.executable, str(path), *args]

    monkeypatch.setattr(recipes, "launch_command", fake)
    monkeypatch.setattr(recipes, "OUT", tmp_path / "results")
    monkeypatch.setattr(recipes, "RUNS", tmp_path / "runs")
    return launches
