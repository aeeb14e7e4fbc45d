"""What a run records: config.yaml, metrics.jsonl, summary.json in output_dir, and W&B through Accelerate.

Only the main process writes or talks to the trackers (which ones, and W&B's mode: trackers.py). metrics.jsonl
is always written, whatever W&B does; each line is one event: {"event": "start"|"step"|"train"|"val"|"test"|
"stop"|"bad_step"|"diverged"|"reformed", "step": optimizer step, "epoch": ..., ...}.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from alexdist.config import Recipe, dump_yaml, flatten
from alexdist.fileio import atomic_write_text, read_jsonl
from alexdist.tracking.trackers import plain_config, trackers, wandb_mode


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _truncate_after(path: Path, step: int, ends_at_once: bool) -> None:
    """Keep the events up to `step`, minus a mid-epoch evaluation at `step` where the epoch goes on (a larger
    train.max_steps), unless this attempt ends at once with that evaluation recorded (`ends_at_once`: the target
    reached, or a cap at or below `step`) and so logs nothing again."""
    kept = [e for e in read_jsonl(path)  # a line cut by a crash is dropped
            if e.get("step", 0) < step
            or (e.get("step") == step and (not e.get("partial_epoch") or ends_at_once))]
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in kept))


class RunLog:
    """The run directory's files and the trackers, for the main process (a no-op on the others)."""

    def __init__(self, accelerator, recipe: Recipe):
        self.accelerator = accelerator
        self.recipe = recipe
        self.dir = Path(recipe.output_dir)
        self.main = accelerator.is_main_process
        self.mode = wandb_mode(recipe)
        self.trackers = trackers(recipe)
        self.t0 = time.time()
        self._metrics = None

    def start(self, info: dict[str, Any], resume_step: int | None = None, run_id: str | None = None,
              ends_at_once: bool = False) -> str | None:
        """Write config.yaml, open metrics.jsonl and the trackers; returns the W&B run id (main process).

        On resume, metrics.jsonl drops what was logged after the checkpoint (that part is trained again) and
        W&B continues the run with the same id; `ends_at_once`: the resumed run is over and evaluated at its
        checkpoint's step, whose events are then its last.
        """
        if not self.main:
            return run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(dump_yaml(self.recipe))
        metrics = self.dir / "metrics.jsonl"
        if resume_step is not None and metrics.is_file():
            _truncate_after(metrics, resume_step, ends_at_once)
        # A fresh start (no checkpoint to resume) redoes everything: what an earlier attempt logged goes.
        self._metrics = open(metrics, "a" if resume_step is not None else "w", buffering=1)  # noqa: SIM115 (open for the run)
        if self.trackers:
            run_id = self._start_trackers(info, run_id)
        self.event("start", resume_step or 0, 0, **info)
        return run_id

    def _start_trackers(self, info: dict[str, Any], run_id: str | None) -> str | None:
        """Accelerate's trackers, each with the flattened recipe as its config; the W&B run id."""
        t = self.recipe.tracking
        config = {**flatten(self.recipe.to_dict()), **{f"run.{k}": v for k, v in info.items()}}
        init_kwargs = {}
        if self.mode:
            os.environ["WANDB_MODE"] = self.mode
            os.environ.setdefault("WANDB_SILENT", "true")
            auto_tags = [self.recipe.model.name, info.get("strategy", "ddp"), f"precision-{self.recipe.precision}",
                         f"world-{info.get('world_size', 1)}"]
            wandb_kwargs = {
                "entity": t.entity,
                "group": t.group or self.recipe.name,
                "tags": list(dict.fromkeys(auto_tags + list(t.tags))),
                "name": t.run_name,
                "job_type": "train",
                "dir": str(self.dir),
                "mode": self.mode,
            }
            if run_id:
                wandb_kwargs.update(id=run_id, resume="allow")
            init_kwargs["wandb"] = wandb_kwargs
        self.accelerator.init_trackers(t.project, init_kwargs=init_kwargs)
        for tracker in self.accelerator.trackers:
            tracker.store_init_configuration(config if tracker.name == "wandb" else plain_config(config))
        return self.accelerator.get_tracker("wandb", unwrap=True).id if self.mode else run_id

    def event(self, event: str, step: int, epoch: int, **values: Any) -> None:
        """Append one event to metrics.jsonl and send its numbers to the trackers as `<event>/<key>`."""
        if not self.main:
            return
        rec = {"event": event, "step": step, "epoch": epoch, "time": round(time.time() - self.t0, 3), **values}
        self._metrics.write(json.dumps(rec) + "\n")
        if self.trackers and event != "start":
            nums = {f"{event}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
            self.accelerator.log({**nums, "epoch": epoch}, step=step)

    def confusion(self, step: int, classes: list[str], matrix: list[list[int]]) -> None:
        """An evaluation's confusion matrix: output_dir/confusion.png (eval.confusion_png) and, in W&B, a per-class
        accuracy table and W&B's confusion-matrix plot."""
        if not self.main:
            return
        if self.recipe.eval.confusion_png:
            from alexdist.tracking.figures import confusion_png

            confusion_png(self.dir / "confusion.png", classes, matrix, f"{self.recipe.name}, step {step}")
        if self.mode:
            import wandb

            k = len(classes)
            per_class = [[classes[i], matrix[i][i] / max(1, sum(matrix[i]))] for i in range(k)]
            truth = [i for i in range(k) for j in range(k) for _ in range(matrix[i][j])]
            preds = [j for i in range(k) for j in range(k) for _ in range(matrix[i][j])]
            self.accelerator.get_tracker("wandb").log(  # W&B's own objects: for W&B only
                {"test/per_class_acc": wandb.Table(columns=["class", "accuracy"], data=per_class),
                 "test/confusion": wandb.plot.confusion_matrix(y_true=truth, preds=preds, class_names=classes)},
                step=step)

    def say(self, line: str) -> None:
        """Print a line once per job (Accelerate's `print` prints once per node)."""
        if self.main:
            print(line, flush=True)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json (atomically), copy it into the W&B summary, close the trackers; then every rank
        waits for the main process before the process group goes. Without that wait, a rank on another node
        could exit first (75 after a stop) and `srun --kill-on-bad-exit` would kill rank 0 mid-write."""
        if self.main:
            summary = {**summary, "wall_time_s": round(time.time() - self.t0, 2)}
            atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            if self.mode:
                run = self.accelerator.get_tracker("wandb", unwrap=True)
                run.summary.update({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
            self._metrics.close()
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.accelerator.wait_for_everyone()
        self.accelerator.state.destroy_process_group()  # what Accelerate's end_training does after closing the trackers
