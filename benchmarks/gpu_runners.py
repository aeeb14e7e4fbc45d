"""How a GPU-check row runs: a training run through the launcher a user would type (`train`, `headline`), or a
probe in a process of its own (`child`), so that a crash or a hang stays in its row. Each returns the row's
result; a row past its time is killed with its whole process tree (processes.run_bounded)."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from common import ROOT, error_line

from alexdist.distributed.launcher import free_port, launch_command
from alexdist.distributed.processes import run_bounded

if TYPE_CHECKING:
    from gpu_plan import Row, Setting

# The bn recipe with SGD (its LARS has no fused kernel and no DeepSpeed path): the check measures the framework
# against a bare loop with the same fused SGD, and runs every strategy.
SGD = ["optim.name=sgd", "optim.lr=0.1", "optim.lr_scaling=none"]


def recipe_args(s: Setting, precision: str, options: list[str], out: Path, train_images: int | None = None,
                test_images: int = 0) -> list[str]:
    return ["bn", *SGD, "data.source=synthetic", f"data.synthetic_train={train_images or s.batch * s.steps}",
            f"data.synthetic_test={test_images or 4 * s.batch}", "data.val_split=null", "train.epochs=2",
            f"train.batch_size={s.batch}", f"model.width_mult={s.width}", f"precision={precision}",
            "checkpoint.at_epoch_end=false", "train.log_every=0", "tracking.wandb=false", f"output_dir={out}",
            *options]


def train(s: Setting, row: Row, env: dict, timeout: int, headline: bool = False) -> dict:
    """Two epochs of the bn recipe through the row's launcher: img/s of the second, peak memory, final loss; or,
    for a row that must fail (expect_exit), its bad steps and message."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = recipe_args(s, row.precision, row.options, out, s.epoch_images if headline else None,
                           s.test_images if headline else 0)
        proc = run_bounded(launch_command(args, 1, row.launcher, row.config_file), timeout, cwd=ROOT,
                           env={**env, **row.env})
        if proc.returncode != row.expect_exit:
            return {"exit": proc.returncode, "error": error_line(proc.stderr)}
        events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if row.expect_exit:
            return {"exit": proc.returncode, "bad_steps": [e["step"] for e in events if e["event"] == "bad_step"],
                    "message": error_line(proc.stderr)}
        summary = json.loads((out / "summary.json").read_text())
    trains, tests = [e for e in events if e["event"] == "train"], [e for e in events if e["event"] == "test"]
    result = {"exit": 0, "images_per_s": trains[-1]["images_per_s"], "loss": trains[-1]["loss"],
              "peak_memory_gib": (summary.get("peak_memory_bytes") or 0) / 2**30,
              "distributed_type": summary["distributed_type"], "backend": summary.get("backend")}
    if headline:  # the second epoch, evaluation included: from one test event to the next
        result.update(epoch_s=tests[-1]["time"] - tests[-2]["time"], train_s=trains[-1]["epoch_time_s"])
    return result


def headline(s: Setting, row: Row, env: dict, timeout: int) -> dict:
    """One CIFAR-sized epoch (50,000 images, evaluation of 10,000) in the fastest setting; it may take longer."""
    return train(s, row, env, 2 * timeout, headline=True)


def child(probe: Callable, nproc: int = 1) -> Callable:
    """A runner for `probe` (a function of gpu_probes): this script again with --child, in a process of its own,
    under torchrun with `nproc` processes when the row asks for a real process group."""
    def run(s: Setting, row: Row, env: dict, timeout: int) -> dict:
        args = [str(ROOT / "benchmarks" / "gpu_check.py"), "--child", probe.__name__, "--precision", row.precision,
                *(["--cpu"] if s.device == "cpu" else []), *[f"--option={o}" for o in row.options]]
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                  str(free_port())] if row.launcher == "torchrun" else [sys.executable]
        proc = run_bounded([*launch, *args], timeout, cwd=ROOT, env=env)
        if proc.returncode != 0:
            return {"exit": proc.returncode, "error": error_line(proc.stderr)}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    run.__name__ = f"child({probe.__name__})"
    return run


def training_tflop(s: Setting, images: int) -> float:
    """Training FLOP for `images` images of the bn recipe's model: 3 x the forward (backward ~2x forward)."""
    from alexdist.models import build_model, flops_per_image

    return 3 * flops_per_image(build_model("alexnet_bn", 32, width_mult=s.width), 32) * images / 1e12
