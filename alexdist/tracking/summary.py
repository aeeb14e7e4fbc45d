"""What a run says about itself: its facts (metrics.jsonl's start event, the trackers' config, summary.json), the
line that describes it at start, and summary.json at the end. Plain values in, plain values out: the training
package hands them over."""

from __future__ import annotations

import enum

from alexdist.checkpoint.state import TrainState
from alexdist.config import Recipe
from alexdist.tracking.runlog import git_commit


class Ending(enum.Enum):
    """Why a run attempt ends; the value is summary.json's `status`."""

    FINISHED = "finished"  # the schedule's last step (train.epochs) is done
    MAX_STEPS = "max_steps"  # train.max_steps reached; the same command with a larger cap continues it
    STOP_REQUESTED = "stopped"  # a signal or output_dir/STOP: checkpointed, exit 75, resumable
    TARGET_REACHED = "target_reached"  # an evaluation reached train.stop_at_acc


def describe_run(r: Recipe, world: int, device: str, strategy: str, batches, info: dict, n_params: int,
                 resumed: str | None, step: int) -> str:
    """The one line that describes the run at start."""
    split = f" | {info['val_images']} validation images held out" if info.get("val_images") else ""
    data = (f"streamed from disk ({info['data_workers']} loader workers per process)" if info.get("data_loader") ==
            "stream" else "in memory")
    return (
        f"alexdist: {r.model.name} @ {info['input_size']}px ({n_params / 1e6:.2f} M params) on {world} x {device}, "
        f"{strategy} | effective batch {batches.effective_batch} = {r.train.batch_size} per process x {world} "
        f"processes x {r.train.grad_accum} accumulation | {batches.steps_per_epoch} steps/epoch, "
        f"{info['total_steps']} steps, {info['warmup_steps']} warmup, peak lr {info['peak_lr']:.4g} | precision "
        f"{r.precision} | data {data}{split} | output {r.output_dir}"
        + (f" | resumed from {resumed} at step {step}" if resumed else "")
    )


def run_summary(recipe: Recipe, state: TrainState, info: dict, ending: Ending, peaks: list[int], rank: int,
                device_type: str, noise: dict | None, checksums: dict) -> dict:
    """summary.json: how the run ended, what it measured, what selected its model, and its facts."""
    val = state.selected_on == "val"
    return {
        "status": ending.value, "recipe": recipe.name, "model": recipe.model.name, "precision": recipe.precision,
        **info,
        "epochs_run": state.epoch + (1 if state.step_in_epoch else 0), "steps": state.global_step,
        "final_test_acc": state.test_acc, "final_test_loss": state.test_loss,
        "final_val_acc": state.val_acc, "final_val_loss": state.val_loss,
        # Top-5 with more than 10 classes (ImageNet's second figure); absent otherwise.
        **{f"final_{k}_acc5": v for k, v in (("test", state.test_acc5), ("val", state.val_acc5)) if v is not None},
        # Model selection: on validation with data.val_split, else on test (then the figures are optimistic).
        "selected_on": state.selected_on,
        f"best_{state.selected_on}_acc": state.best_acc, "best_epoch": state.best_epoch,
        **({"test_acc_at_best_epoch": state.test_acc_at_best} if val else {}),
        "time_to_acc": recipe.tracking.time_to_acc, "time_to_target_s": state.time_to_target_s,
        "epoch_to_target": state.epoch_to_target,
        # Where the selection accuracy first reached the target, interpolated between the evaluations around it.
        "target_crossing": state.target_crossing,
        "noise_scale": noise,
        "images_per_s": sum(state.images_per_s) / max(1, len(state.images_per_s)),
        "train_time_s": round(state.train_time_s, 2), "git_commit": git_commit(), **checksums,
        # Every rank's peak: CUDA's peak allocation on GPUs, the peak resident set size on CPUs; and this rank's
        # on a GPU (the GPU check reads it).
        "peak_memory_bytes_per_rank": peaks,
        "peak_memory_bytes": peaks[rank] if device_type == "cuda" else None,
        "wandb_run_id": state.wandb_run_id,
        # Each resume that changed the recipe (config.yaml holds the latest values): the step and the changes.
        "config_changes": state.config_changes,
    }
