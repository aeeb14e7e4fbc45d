"""The checkpoint policy as pure functions: when a checkpoint is due, and which ones rotation keeps."""

from __future__ import annotations

from alexdist.config import CheckpointConfig


def save_due(cfg: CheckpointConfig, steps_per_epoch: int, global_step: int, step_in_epoch: int, *,
             epoch_end: bool = False, stopping: bool = False) -> bool:
    """The checkpoint policy. Asked after every optimizer step (`epoch_end` and `stopping` false), after each
    epoch's evaluation (`epoch_end`: the epoch is complete) and when the run stops here (`stopping`: a stop
    request, or the run's last step):
    - a run that stops always leaves a checkpoint of where it stopped;
    - after an epoch's evaluation: if checkpoint.at_epoch_end (the checkpoint then records the evaluation);
    - after a step: every checkpoint.every_steps steps, unless this step ends an epoch that is saved after its
      evaluation anyway."""
    if stopping:
        return True
    if epoch_end:
        return cfg.at_epoch_end
    saved_after_eval = cfg.at_epoch_end and step_in_epoch == steps_per_epoch
    return bool(cfg.every_steps) and global_step % cfg.every_steps == 0 and not saved_after_eval


def keep_after_rotation(checkpoints: list[tuple[int, float | None]], keep: int) -> set[int]:
    """The steps rotation keeps, from (step, selection accuracy or None) oldest first: the newest `keep`, plus the
    best by selection accuracy (validation with a split, else test; the first to reach it on ties, the epoch that
    summary.json's best_epoch names: an evaluation must beat the best so far to replace it)."""
    kept = {step for step, _ in checkpoints[-keep:]}
    scored = [(acc, -step) for step, acc in checkpoints if acc is not None]
    if scored:
        kept.add(-max(scored)[1])
    return kept
