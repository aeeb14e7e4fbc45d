"""Train a model of the AlexNet family from a recipe.

    accelerate launch -m alexdist.train bn [key=value ...]             # a shipped recipe, by name
    accelerate launch -m alexdist.train recipes/bn.yaml [key=value ...]  # or any recipe file
    accelerate launch --multi_gpu --num_processes 2 -m alexdist.train quickstart   # 2 CPU ranks
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m alexdist.train bn
    alexdist train quickstart train.epochs=1                            # one process, no launcher

Read top to bottom: `setup` builds the run (accelerator, data on the device, model, optimizer, schedule,
resume if a checkpoint exists); then each epoch runs its optimizer steps (each over `grad_accum`
micro-batches), evaluates and checkpoints; `finish` writes the final weights and the summary.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from alexdist.config import Recipe, load_recipe
from alexdist.distributed import exit_now, lost_peer
from alexdist.errors import run_command
from alexdist.launcher import launch_rank
from alexdist.loop import Ending, end_epoch, finish, reached_end, record_step, stop_here, train_step
from alexdist.metrics import EpochMeter
from alexdist.progress import Progress
from alexdist.run import Run, setup
from alexdist.stopping import STOPPED_EXIT_CODE


def train(recipe: Recipe) -> dict:
    """Train (or continue) the run a recipe describes; returns its summary."""
    with setup(recipe) as run:  # holds output_dir until the run ends, however it ends
        return _loop(run)


def _loop(run: Run) -> dict:
    """Epochs of optimizer steps, each epoch evaluated and checkpointed; then the final weights and summary."""
    recipe, state, log_every = run.recipe, run.state, run.recipe.train.log_every
    main = run.accelerator.is_main_process
    progress = Progress(main, run.total_steps, run.batches.effective_batch, state.global_step)
    ending = reached_end(run)  # a finished run resumed again ends at once
    for epoch in range(state.epoch, recipe.train.epochs):
        if ending:
            break
        run.model.train()
        # A run resumed mid-epoch carries the epoch's global sums so far.
        run.meter = EpochMeter(run.accelerator.device, state.epoch_sums if state.step_in_epoch else None, main)
        started = (time.time(), state.step_in_epoch)
        progress.start_epoch(epoch, run.batches.steps_per_epoch, state.step_in_epoch)
        for micro in run.batches.epoch(epoch, start_step=state.step_in_epoch):
            result = train_step(run, micro, state.global_step + 1)
            record_step(run, result, epoch)
            log_now = log_every and state.global_step % log_every == 0
            loss = result.loss.item() if log_now else None  # the log line's host sync
            if log_now:
                run.log.event("step", state.global_step, epoch + 1, loss=loss, lr=run.scheduler.get_last_lr()[0])
            progress.step(state.global_step, loss, run.scheduler.get_last_lr()[0])
            if ending := reached_end(run) or (Ending.STOP_REQUESTED if result.stop_requested else None):
                break
            run.ckpt.maybe_save(state)
        progress.end_epoch()
        if ending is Ending.STOP_REQUESTED:
            stop_here(run, epoch)
            break
        if end_epoch(run, epoch, started, stopping=ending is not None):
            ending = Ending.TARGET_REACHED
            break
    return finish(run, ending or reached_end(run) or Ending.FINISHED)


def main(argv: list[str] | None = None, prog: str = "python -m alexdist.train") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Train from a recipe. Overrides are dotted key=value pairs, e.g. train.epochs=5 "
        "model.name=alexnet.",
    )
    ap.add_argument("recipe", help="a shipped recipe's name (`alexdist recipes` lists them) or a recipe YAML file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    args, unknown = ap.parse_known_args(argv)
    if unknown:  # habits from jsonargparse / Lightning: --train.epochs=5
        bad = unknown[0]
        fix = bad.lstrip("-") if "=" in bad else f"{bad.lstrip('-')}=VALUE"
        print(f"alexdist: error: unknown option {bad}: overrides are key=value without dashes; write {fix}",
              file=sys.stderr)
        return 2

    def body() -> int:
        summary = train(load_recipe(args.recipe, args.overrides))
        return STOPPED_EXIT_CODE if summary["status"] == Ending.STOP_REQUESTED.value else 0

    try:
        return run_command(body)
    except RuntimeError as exc:
        if not lost_peer(exc):
            raise
        # Another process died (or hung past distributed.timeout_s) and this one's collective failed.
        detail = re.sub(r"^\[[^]]*\] ", "", str(exc).strip().splitlines()[0]).split(". ")[0][:120]
        print(
            f"alexdist: error: rank {launch_rank()} lost contact with the other processes ({detail}); the run "
            f"continues from its last complete checkpoint when relaunched (checkpoint.resume=auto)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    exit_now(main())
