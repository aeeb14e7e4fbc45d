"""Fixtures only (helpers.py holds the functions): a dataset cache for the session, the fp32 accuracy band of the
digits run and its untrained control, the float64 DDP runs that FSDP2 and ZeRO are compared with, a clean
Accelerate state; the order and grouping of test files under pytest-xdist; and one line for skipped Slurm tests."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/unit and tests/e2e import `helpers` from here

from helpers import (
    DIGITS_CONTROL,
    DIGITS_RUN,
    DIGITS_SEEDS,
    EQUIV_ACCUM_CLIP,
    FP64,
    AccuracyBand,
    check,
    final_accuracy,
    launch,
)


def pytest_configure(config):
    """DeepSpeed JIT-builds its CPU communication op into TORCH_EXTENSIONS_DIR, by default one folder for every
    environment: the suites of two checkouts (a worktree beside the main one) rebuild each other's op at every
    ZeRO launch, 94 s a launch instead of 19 s (measured on one AMD EPYC core). One folder per environment."""
    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / f"alexdist-{tag}"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One dataset cache for the session: digits are decoded once, later runs load the cache."""
    return tmp_path_factory.mktemp("alexdist-cache")


@pytest.fixture(scope="session")
def own_model_dir() -> Path:
    """A folder holding a user's model module (mymodels.py: model.name=mymodels:Tiny), for PYTHONPATH."""
    return Path(__file__).parent / "own_model"


@pytest.fixture(scope="session")
def accuracy_band(tmp_path_factory, cache_dir) -> AccuracyBand:
    """DIGITS_RUN in fp32 with seeds 0, 1, 2 (two at a time), on one process; and the control's run dir."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("digits-band")

    def one(seed: int) -> Path:
        check(launch(DIGITS_RUN + [f"train.seed={seed}", f"output_dir={root / f'seed{seed}'}"], cache_dir))
        return root / f"seed{seed}"

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(one, DIGITS_SEEDS))
    accs = [final_accuracy(r)[0] for r in runs]
    return AccuracyBand(accs, final_accuracy(runs[0])[1])


@pytest.fixture(scope="session")
def untrained_control(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("digits-control") / "control"
    check(launch(DIGITS_RUN + DIGITS_CONTROL + [f"output_dir={out}"], cache_dir))
    return out


@pytest.fixture(scope="session")
def ddp_fp64(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """EQUIV_ACCUM_CLIP under DDP on 2 processes in float64, and the same without clipping (the control that
    clipping acted): the reference of both test_fsdp.py and test_zero_equivalence.py (one worker: SHARED_WORKER)."""
    root = tmp_path_factory.mktemp("ddp-fp64")
    runs = {"ddp": root / "ddp", "ddp_noclip": root / "ddp_noclip"}
    for name, extra in [("ddp", []), ("ddp_noclip", ["train.grad_clip=null"])]:
        check(launch(EQUIV_ACCUM_CLIP + FP64 + extra + [f"output_dir={runs[name]}"], cache_dir, nproc=2))
    return runs


# -- a run built in this process --------------------------------------------------------------------------

@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons: reset them around a test that builds its own Accelerator, and
    put back the signal handlers that a run installs."""
    from accelerate.state import AcceleratorState, GradientState

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for s, h in handlers.items():
        signal.signal(s, h)


# -- running two test files at once (`make test`: pytest-xdist, `-n 2 --dist loadfile`) ----------------------

# Files whose tests must share one worker beyond their own file: the session's fp32 digits band (minutes of
# training) and float64 DDP runs (ddp_fp64) are each made once, and Slurm jobs queue on one cluster instead of
# competing for its two nodes.
SHARED_WORKER = {"test_speed_options.py": "reference-runs", "test_fsdp.py": "reference-runs",
                 "test_zero_equivalence.py": "reference-runs",
                 "test_slurm.py": "slurm", "test_slurm_two_nodes.py": "slurm"}

# The longest units of work first, so that the short ones (the rest, tests/unit last) fill in at the end and both
# workers finish together: by the seconds each took in the last full run (`bash .ci/run`, 2 workers), longest
# first. A unit not listed runs after these, in collection order.
LONGEST_FIRST = ["reference-runs", "slurm", "test_crash_recovery.py", "test_elastic.py", "test_stop_at_any_step.py",
                 "test_recipes_learn.py", "test_streamed.py", "test_error_messages.py", "test_gpu_check.py",
                 "test_compare.py", "test_launcher_death.py", "test_ddp_equivalence.py", "test_quickstart.py",
                 "test_buffer_broadcasts.py"]


def _unit(path: Path) -> str:
    """A test file's unit of work: its SHARED_WORKER group or itself (tests/unit has files of the same names)."""
    return SHARED_WORKER.get(path.name, path.name) if path.parent.name == "e2e" else str(path)


def pytest_collection_modifyitems(config, items):
    """Order the files by LONGEST_FIRST (a stable sort: a file's own tests keep their order). xdist hands units
    out in collection order (`--no-loadscope-reorder`, since its own reorder counts tests, not seconds)."""
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.path), len(rank)))


@pytest.hookimpl(optionalhook=True)  # plain `pytest` (no xdist installed) must still run
def pytest_xdist_make_scheduler(config, log):
    """Each test file is one unit of work, so its module-scoped runs are built once; the files of SHARED_WORKER
    share one. (xdist's own `--dist loadgroup` marks no longer reach the scheduler under pytest 9, which ignores
    the test-id suffix they rely on; its scheduler hook is the supported way to choose the units.)"""
    from xdist.scheduler import LoadFileScheduling

    class ByFile(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(Path(nodeid.split("::", 1)[0]))

    return ByFile(config, log)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line for the Slurm tests a plain run skips (no cluster answered), so a skip is never silent."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "slurm" in r.nodeid]
    if skipped:
        terminalreporter.write_line(
            f"alexdist: {len(skipped)} Slurm tests skipped: no Slurm cluster answered (start one with `bash "
            f"slurm/local/start_local_slurm.sh start --nodes 2`; .ci/run does, and sets ALEXDIST_REQUIRE_SLURM=2)")
