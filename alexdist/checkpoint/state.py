"""What a checkpoint records besides tensors (trainer_state.json), and finding the complete checkpoints.

A checkpoint directory is complete once it is named `step-NNNNNNN` (checkpointer.py writes under `.tmp-*` and
renames) and holds its trainer state.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Everything besides tensors that a run needs to continue exactly where it stopped."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # 0-based epoch in progress (the next one when step_in_epoch == 0)
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    effective_batch: int = 0
    world_size: int = 1
    strategy: str = "ddp"
    zero_stage: int | None = None
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss*n, correct, n (global)
    # Model selection reads `selected_on`: "val" with data.val_split (its fingerprint below), else "test".
    selected_on: str = "test"
    val_fingerprint: str | None = None  # the held-out indices' hash: a resume must hold out the same images
    data_loader: str = "memory"  # the data path taken (data.loader): a resume must take the same
    data_fingerprint: str | None = None  # streamed: the indexed files' hash (a resume on changed data is refused)
    normalization: dict | None = None  # {"mean", "std"} the run normalizes with (its weights file records it)
    best_acc: float = -1.0  # the best selection accuracy so far, and its epoch
    best_epoch: int = 0
    test_acc_at_best: float | None = None  # the test accuracy of that epoch's model (what selection reports)
    selection_acc: float | None = None  # the selection accuracy measured at exactly this step, if any
    val_acc: float | None = None  # validation and test figures measured at exactly this step, if any
    val_loss: float | None = None
    test_acc: float | None = None
    test_loss: float | None = None
    val_acc5: float | None = None  # top-5 beside them, with more than 10 classes
    test_acc5: float | None = None
    wandb_run_id: str | None = None
    train_time_s: float = 0.0
    # Training time and epoch at which the selection accuracy first reached tracking.time_to_acc.
    time_to_target_s: float | None = None
    epoch_to_target: int | None = None
    target_reached: bool = False  # train.stop_at_acc was reached: the run is over
    # The latest selection evaluation, at an epoch end or inside one (eval.val_checks): [step, accuracy, loss]; and
    # where the selection accuracy first reached the target, interpolated between two evaluations
    # (training/val_checks.py): its schedule and its record follow from the checkpoint alone.
    last_selection: list[float] | None = None
    target_crossing: dict | None = None
    classes: list[str] = field(default_factory=list)  # the data's class names (the model's head size)
    images_per_s: list[float] = field(default_factory=list)
    noise_scale: dict | None = None  # the gradient noise scale's running averages (training/noise_scale.py)
    # A resume that changed train.epochs alone: [step, progress, warmup steps] where the decay continues from
    # (training/optim.py, LRSchedule), so that the lr never jumps up.
    schedule_anchor: list[float] | None = None
    # Every resume that changed the recipe: {"step": N, "changes": ["key: old -> new", ...]} (summary.json).
    config_changes: list[dict] = field(default_factory=list)

    @property
    def evaluated(self) -> bool:
        """Whether the figures of an evaluation at exactly this step are recorded."""
        return self.test_acc is not None

    def forget_evaluation(self) -> None:
        """After a step: the figures measured at an earlier step no longer describe the weights."""
        self.selection_acc = self.val_acc = self.val_loss = self.test_acc = self.test_loss = None
        self.val_acc5 = self.test_acc5 = None


# What an evaluation after a step changes in the state (training/epoch_end.py, record_epoch; and the snapshot
# before a save): what a checkpoint written before its step's evaluation gains afterwards (Checkpointer).
EVALUATION_FIELDS = ("epoch", "step_in_epoch", "epoch_sums", "selection_acc", "val_acc", "val_loss", "test_acc",
                     "test_loss", "val_acc5", "test_acc5", "best_acc", "best_epoch", "test_acc_at_best",
                     "time_to_target_s",
                     "epoch_to_target", "target_reached", "train_time_s", "last_selection", "target_crossing")


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Only renamed (`step-*`) directories with a trainer state count."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=step_of)


def read_state(path: Path) -> TrainState:
    data = json.loads((Path(path) / STATE_FILE).read_text())
    known = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in data.items() if k in known})
