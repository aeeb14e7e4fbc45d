"""What a resume may change: the recipe's keys sorted into three kinds, compared with the checkpoint's config.yaml.

- run-defining (RUN_DEFINING): the model, the data, the optimizer's kind. The checkpoint's tensors belong to them;
  another value is refused unless checkpoint.allow_config_change (and may then still fail to load).
- training (TRAINING_KEYS, TRAINING_SECTIONS): what shapes the updates from here on (the lr and its schedule, the
  optimizer's settings, the epochs, the seed and augmentation that order and alter the data, clipping,
  smoothing, dropout, precision). Refused unless checkpoint.allow_config_change; then the new values apply from
  the resumed step (training/optim.py re-applies them over the checkpoint's optimizer and schedule state).
- everything else is free: train.max_steps, logging, tracking, speed, checkpoint cadence, the accumulation at the
  same effective batch (the effective batch itself is checked on its own).

Lightning and the HF Trainer restore the checkpoint's optimizer silently whatever the recipe now says; here the
record (config.yaml, summary.json's config_changes) and the training always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from alexdist.config import Recipe, flatten

RUN_DEFINING = ("model.name", "model.width_mult", "model.input_size", "data.source", "data.revision",
                "data.image_size", "data.val_split", "data.synthetic_train", "data.synthetic_test", "optim.name",
                "data.mean", "data.std")
TRAINING_SECTIONS = ("optim.", "schedule.", "augment.")
NOT_RECORDED = ("checkpoint.resume:", "checkpoint.allow_config_change:")
TRAINING_KEYS = ("train.epochs", "train.seed", "train.grad_clip", "train.label_smoothing", "train.ema_decay",
                 "train.ema_warmup", "model.dropout", "model.sync_bn", "precision", "data.eval_resize")


@dataclass
class ConfigChanges:
    """`key: saved -> now` for each key that differs, by kind."""

    defining: list[str]
    training: list[str]
    free: list[str]

    @property
    def recorded(self) -> list[str]:
        """What summary.json's config_changes keeps: every change but the resume's own switches."""
        return [c for c in self.guarded + self.free if not c.startswith(NOT_RECORDED)]

    @property
    def guarded(self) -> list[str]:
        """The changes that need checkpoint.allow_config_change."""
        return self.defining + self.training


def saved_config(checkpoint: str | Path) -> dict | None:
    """The checkpoint's config.yaml as flat `section.key` values; None without one."""
    path = Path(checkpoint) / "config.yaml"
    return flatten(yaml.safe_load(path.read_text()) or {}) if path.is_file() else None


def kind(key: str) -> str:
    if key in RUN_DEFINING:
        return "defining"
    if key in TRAINING_KEYS or key.startswith(TRAINING_SECTIONS):
        return "training"
    return "free"


def config_changes(checkpoint: str | Path, recipe: Recipe) -> ConfigChanges:
    """The differences between the checkpoint's config.yaml and `recipe`, by kind (none without a config.yaml)."""
    changes = ConfigChanges([], [], [])
    saved = saved_config(checkpoint)
    if saved is None:
        return changes
    now = flatten(recipe.to_dict())
    for key in now:  # a key only one side knows (added or removed by an alexdist upgrade) is no change
        if key in saved and saved[key] != now[key]:
            getattr(changes, kind(key)).append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return changes


def refusal(checkpoint: str | Path, changes: ConfigChanges, step: int) -> str | None:
    """The one-line refusal of a resume whose guarded keys changed, None if it may go on."""
    if changes.defining:
        return (f"checkpoint {checkpoint} was trained with another model, data or optimizer "
                f"({'; '.join(changes.defining)}); resume with the checkpoint's values, choose another output_dir, "
                f"or set checkpoint.allow_config_change=true if the change is on purpose")
    if changes.training:
        return (f"checkpoint {checkpoint} was trained with other settings ({'; '.join(changes.training)}); resume "
                f"with the checkpoint's values, or set checkpoint.allow_config_change=true to train with the new "
                f"ones from step {step} on (more train.epochs: the lr then decays from where it is)")
    return None
