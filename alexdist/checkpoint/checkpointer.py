"""The Checkpointer: it owns the checkpoint policy of a run (policy.py), writes checkpoints atomically through
the run's strategy (its backend: DDP's safetensors shards, ZeRO's partitions, FSDP2's DCP shards), rotates them,
and finds where to resume.

Layout of one checkpoint (`output_dir/checkpoints/step-NNNNNNN/`):
    model.safetensors | model-0000i-of-0000n.safetensors + index   DDP weights (unwrapped names), sharded
    pytorch_model/ + latest                                          DeepSpeed's partitioned files (ZeRO)
    dcp/                                                             FSDP2: model + optimizer shards (DCP)
    optimizer.bin, scheduler.bin, scaler.pt                          Accelerate's save_state
    random_states_<rank>.pkl                                         every rank's RNG state
    trainer_state.json                                               data position, best, tracker run id, ...
    config.yaml                                                      the resolved recipe
    manifest.json                                                    every file's size and SHA-256

A checkpoint is written under `.tmp-step-NNNNNNN` and renamed when every rank has finished, so a directory
named `step-*` is always complete; a crash mid-save leaves only a `.tmp-*` that resume ignores and the next
save removes. Rotation keeps the newest `checkpoint.keep` plus the best by test accuracy; a checkpoint is
renamed to `.del-step-*` before it is deleted, so a crash mid-deletion never leaves a half-deleted `step-*`.
A save that fails (disk full, permissions) fails on every rank together, removes its `.tmp-*` and leaves the
earlier checkpoints as they were; a model with non-finite weights or statistics is never saved. Every rank
fsyncs the files before they are agreed complete, and rank 0 then records their sizes and checksums in
manifest.json: `resume: auto` moves a checkpoint damaged after its save (a truncated or altered file) aside as
`.damaged-step-*` with a warning and resumes from the one before it; an explicit resume path refuses it.

Loading: the weights go through safetensors; every pickle in the checkpoint (optimizer, scheduler, RNG and
DeepSpeed state) is first checked to hold nothing but tensors and plain data (`pickle_checks.check_pickles`),
because Accelerate skips a bad RNG file silently and DeepSpeed unpickles with `weights_only=False`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from alexdist import faults
from alexdist.checkpoint.config_changes import config_changes, refusal
from alexdist.checkpoint.manifest import damage, write_manifest
from alexdist.checkpoint.policy import keep_after_rotation, save_due
from alexdist.checkpoint.state import (
    EVALUATION_FIELDS,
    STATE_FILE,
    TrainState,
    complete_checkpoints,
    read_state,
    step_of,
)
from alexdist.config import Recipe, dump_yaml
from alexdist.distributed.collectives import any_rank, from_main, local, plain_module
from alexdist.distributed.strategy import Strategy
from alexdist.errors import AlexdistError, CheckpointError, DivergedError, SetupError, brief
from alexdist.fileio import atomic_write_text, fsync_dir, fsync_tree, share_tree
from alexdist.pickle_checks import check_pickles


class Checkpointer:
    """Owns the checkpoint policy of one run. Every method is called on every rank, in the same order."""

    def __init__(self, accelerator, recipe: Recipe, strategy: Strategy, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, steps_per_epoch: int, val_fingerprint: str | None = None,
                 data_path: tuple[str, str | None] = ("memory", None)):
        self.accelerator = accelerator
        self.data_path = data_path  # (data.loader taken: memory | stream, the indexed files' fingerprint)
        self.val_fingerprint = val_fingerprint  # the run's validation split (data.val_split), None without
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.recipe = recipe
        self.cfg = recipe.checkpoint
        self.steps_per_epoch = steps_per_epoch
        self.root = Path(recipe.output_dir) / "checkpoints"
        self._step = 0  # the step being saved
        self.resumed_from: Path | None = None  # the checkpoint this attempt continues (load)
        strategy.register_checkpoint_hooks(accelerator, self.cfg.max_shard_size, self._weights_written)

    def _weights_written(self) -> None:
        faults.kill_point("save.weights", self._step, self.recipe.output_dir)

    # -- when ---------------------------------------------------------------------------------------------
    def maybe_save(self, state: TrainState, snapshot: Callable[[TrainState], None], *, epoch_end: bool = False,
                   final: bool = False) -> Path | None:
        """Save if the policy says so (policy.save_due; `final`: the run stops here); the checkpoint's path, or
        None. `snapshot` brings the TrainState up to date just before a save (the epoch's sums agreed over ranks,
        the training time): only called when a checkpoint is written, because agreeing the sums is a collective."""
        if not save_due(self.cfg, self.steps_per_epoch, state.global_step, state.step_in_epoch,
                        epoch_end=epoch_end, stopping=final):
            return None
        snapshot(state)
        return self.save(state)

    def latest(self) -> str | None:
        found = complete_checkpoints(self.recipe.output_dir)
        return str(found[-1]) if found else None

    # -- resume -------------------------------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        """Where to resume from (None: a fresh start), decided on rank 0 and handed to every rank (a collective):
        one look at the shared filesystem, so a stale listing on another node cannot make the ranks disagree."""
        choice = None
        if self.accelerator.is_main_process:
            try:
                choice = self._choose_resume()
            except AlexdistError as exc:
                choice = exc
        choice = from_main(self.accelerator, choice)
        if isinstance(choice, AlexdistError):
            raise choice
        return choice

    def _choose_resume(self) -> Path | None:
        r = self.cfg.resume
        found = complete_checkpoints(self.recipe.output_dir)
        if r == "never":
            if found:
                # Never overwrite or mix with an earlier run's checkpoints.
                raise SetupError(
                    f"checkpoint.resume=never but {self.root} holds an earlier run's checkpoints; choose another "
                    f"output_dir, or resume it with checkpoint.resume=auto"
                )
            return None
        if r == "auto":
            for path in reversed(found):
                problem = damage(path)
                if problem is None:
                    return path
                aside = path.with_name(f".damaged-{path.name}")  # out of resume's view, and of the next save's way
                os.replace(path, aside)
                print(f"alexdist: warning: checkpoint {path} is damaged ({problem}); moved to {aside.name}, "
                      f"resuming from the one before it", file=sys.stderr)
            if found:
                raise CheckpointError(
                    f"every checkpoint in {self.root} is damaged (see the warnings above, now .damaged-step-*); "
                    f"start again in another output_dir, or restore a copy of a checkpoint"
                )
            return None
        path = Path(r)
        if not (path / STATE_FILE).is_file():
            raise SetupError(
                f"checkpoint.resume='{r}' is not a complete checkpoint (no {STATE_FILE}); give a "
                f"{self.root}/step-* directory, 'auto' or 'never'"
            )
        if problem := damage(path):
            raise CheckpointError(
                f"checkpoint {path} is damaged ({problem}); resume from another checkpoint (checkpoint.resume="
                f"PATH, or auto to take the newest good one)"
            )
        return path

    def _check_data(self, path: Path, state: TrainState) -> None:
        """A resume reads the same data the same way: the path (in memory or streamed) and, streamed, the same
        indexed files (their paths, sizes and modification times)."""
        loader, fingerprint = self.data_path
        if state.data_loader != loader:
            how = {"stream": "streamed from disk", "memory": "in memory"}
            was = how.get(state.data_loader, state.data_loader)
            raise CheckpointError(
                f"checkpoint {path} was trained with its data {was}, this run would take it {how[loader]}; resume "
                f"with data.loader={state.data_loader}, or start a new run in another output_dir")
        if loader == "stream" and state.data_fingerprint != fingerprint:
            raise CheckpointError(
                f"checkpoint {path} was trained on other data (indexed files {state.data_fingerprint}, now "
                f"{fingerprint}): files were added, removed or changed since; resume on the data it was trained on, "
                f"or start a new run in another output_dir")

    def load(self, path: Path) -> TrainState:
        """Continue from checkpoint `path`: weights, optimizer, scheduler, RNG states, on this world size."""
        self.resumed_from = path
        state, world = read_state(path), self.accelerator.num_processes
        if state.strategy != self.strategy.name:
            raise SetupError(
                f"checkpoint {path} was written by {state.strategy}, this run uses {self.strategy.name}; resume with "
                f"distributed.strategy={state.strategy}, or export the weights (alexdist export) and start fresh"
            )
        if state.zero_stage != self.strategy.zero_stage:  # the partitions are cut for the stage that wrote them
            raise SetupError(
                f"checkpoint {path} was written by ZeRO-{state.zero_stage}, this run uses ZeRO-"
                f"{self.strategy.zero_stage}; resume with distributed.deepspeed.zero_stage={state.zero_stage}, or "
                f"export the weights (alexdist export) and start fresh"
            )
        if refused := self.strategy.resume_refusal(path, state.world_size, world):
            raise refused
        changes = config_changes(path, self.recipe)
        if (refused := refusal(path, changes, state.global_step)) and not self.cfg.allow_config_change:
            raise CheckpointError(refused)
        self._check_data(path, state)
        if state.val_fingerprint != self.val_fingerprint:
            raise CheckpointError(
                f"checkpoint {path} was trained with another validation split (held-out images "
                f"{state.val_fingerprint or 'none'}, now {self.val_fingerprint or 'none'}): resuming would train on "
                f"images it selected on; resume with the checkpoint's data.val_split and data, or start a new run in "
                f"another output_dir"
            )
        check_pickles(path)
        try:
            self.strategy.load_checkpoint(self.accelerator, self.model, self.optimizer, path, state.world_size)
        except AlexdistError:
            raise
        except Exception as exc:  # shapes of another model, a truncated shard, a missing file...
            raise CheckpointError(
                f"could not load checkpoint {path} into this run ({brief(exc)}); resume from "
                f"another checkpoint (checkpoint.resume=PATH) or start fresh in another output_dir"
            ) from None
        faults.lose_optimizer_point(self.optimizer, state.global_step)
        state.world_size = world
        record = {"step": state.global_step, "changes": changes.recorded}
        if record["changes"] and record not in state.config_changes:  # config.yaml holds only the latest values
            state.config_changes.append(record)
        return state

    # -- save ---------------------------------------------------------------------------------------------
    def save(self, state: TrainState) -> Path | None:
        final = self.root / f"step-{state.global_step:07d}"
        # e.g. an epoch end that is also an every_steps boundary. Rank 0 looks; every rank hears its answer.
        exists = self.accelerator.is_main_process and final.exists()
        if any_rank(self.accelerator, torch.tensor([1.0 if exists else 0.0], device=self.accelerator.device))[0]:
            if self.resumed_from and final.resolve() == self.resumed_from.resolve():  # no step since the resume
                self._add_evaluation(final, state)
            return None
        if not self._agree(all_finite(plain_module(self.accelerator, self.model).state_dict().values())):
            raise DivergedError(
                f"the weights hold NaN/inf at step {state.global_step}: not saving them over the good checkpoints "
                f"in {self.root}; lower optim.lr or set train.grad_clip and resume from the last checkpoint"
            )
        step, out = state.global_step, self.recipe.output_dir
        self._step = step
        tmp = self.root / f".tmp-step-{step:07d}"
        error: OSError | None = None
        try:
            if self.accelerator.is_main_process:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in [*self.root.glob(".tmp-step-*"), *self.root.glob(".del-step-*"),
                              *self.root.glob(".universal-step-*")]:
                    shutil.rmtree(stale, ignore_errors=True)  # left by a crash during an earlier save or load
                tmp.mkdir()
        except OSError as exc:
            error = exc
        self._raise_if_failed(error, tmp, step)  # a collective: no rank writes before the directory exists
        self.strategy.before_save(self.accelerator, self.model)  # a collective: here, where every rank arrives
        error = self._write(tmp, state)
        self._raise_if_failed(error, tmp, step)  # also: every rank's files are on disk
        faults.kill_point("save.before_rename", step, out)
        if self.accelerator.is_main_process:
            write_manifest(tmp)
            os.replace(tmp, final)
            fsync_dir(self.root)
            faults.kill_point("save.after_rename", step, out)
            self._rotate()
        self.accelerator.wait_for_everyone()
        return final

    def _add_evaluation(self, path: Path, state: TrainState) -> None:
        """Every rank: the checkpoint this attempt resumed from was saved before its step's evaluation (a stop
        request, or every_steps, at a step the relaunch then ended at). Its tensors are this step's, so rank 0
        adds the evaluation's fields to its trainer_state.json (the rest, world size included, stays what the
        tensors were saved with). The manifest is rewritten first, accepting the old state file and the new one,
        then the state file is replaced: a crash at any point leaves a checkpoint whose manifest holds."""
        error: OSError | None = None
        if self.accelerator.is_main_process:
            try:
                saved = read_state(path)
                if state.evaluated and not saved.evaluated:
                    for name in EVALUATION_FIELDS:
                        setattr(saved, name, getattr(state, name))
                    text = json.dumps(asdict(saved), indent=2) + "\n"
                    write_manifest(path, also={STATE_FILE: text.encode()})
                    atomic_write_text(path / STATE_FILE, text)
                    fsync_tree(path)
            except OSError as exc:
                error = exc
        self._raise_if_failed(error, None, state.global_step)

    def _write(self, tmp: Path, state: TrainState) -> OSError | None:
        """Every file of the checkpoint into `tmp`, this rank's part; the error that stopped it, if any."""
        step, out = state.global_step, self.recipe.output_dir
        try:
            faults.kill_point("save.begin", step, out)
            # A collective, first: DCP agrees on failures itself.
            if self.strategy.save_sharded(self.accelerator, self.model, self.optimizer, tmp):
                self._weights_written()
            faults.disk_full_point(step)
            self.accelerator.save_state(str(tmp))
            faults.kill_point("save.state", step, out)
            if self.accelerator.is_main_process:
                (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")  # tmp/: atomic as a whole
                (tmp / "config.yaml").write_text(dump_yaml(self.recipe))
            # Every rank (on a network filesystem only the writer's node can flush its files); another rank may
            # rename one of its files away meanwhile: that one is its writer's to flush (and to share: the
            # safetensors files come out 0600, whatever the umask).
            share_tree(tmp, missing_ok=True)
            fsync_tree(tmp, missing_ok=True)
        except OSError as exc:
            return exc
        return None

    def _agree(self, ok: bool) -> bool:
        """True on every rank if `ok` holds on every rank (a collective)."""
        return not any_rank(self.accelerator, torch.tensor([0.0 if ok else 1.0], device=self.accelerator.device))[0]

    def _raise_if_failed(self, error: OSError | None, tmp: Path | None, step: int) -> None:
        if self._agree(error is None):
            return
        if self.accelerator.is_main_process and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = complete_checkpoints(self.recipe.output_dir)
        mine = f"{error.strerror or error} ({error.filename})" if error else None
        if self.accelerator.num_processes == 1:
            what = mine
        else:  # every rank's report (a collective): the message names the rank that failed, and how
            from accelerate.utils import gather_object

            reports = gather_object([mine])
            what = "; ".join(f"rank {r}: {e}" for r, e in enumerate(reports) if e)
        raise CheckpointError(
            f"could not write checkpoint step-{step:07d} in {self.root}: {what}; the earlier checkpoints are "
            f"intact ({kept[-1].name if kept else 'none yet'}): free space or fix permissions, then resume with "
            f"checkpoint.resume=auto"
        )

    def _rotate(self) -> None:
        ckpts = complete_checkpoints(self.recipe.output_dir)
        keep = keep_after_rotation([(step_of(p), _selection_acc(read_state(p))) for p in ckpts], self.cfg.keep)
        for p in ckpts:
            if step_of(p) not in keep:
                doomed = p.with_name(f".del-{p.name}")
                os.replace(p, doomed)  # atomic: the checkpoint is gone from resume's view in one step
                faults.kill_point("save.rotate", self._step, self.recipe.output_dir)
                shutil.rmtree(doomed, ignore_errors=True)


def _selection_acc(state: TrainState) -> float | None:
    """The accuracy that picks the best checkpoint: validation with a split (checkpoints written before the
    split existed recorded only their test accuracy, which was then the selection accuracy)."""
    return state.selection_acc if state.selection_acc is not None else state.test_acc


def all_finite(tensors) -> bool:
    """Whether this rank's values are finite (its shard of an FSDP parameter: DTensor.to_local)."""
    flags = [torch.isfinite(local(t).detach()).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True  # one host sync, not one per tensor
