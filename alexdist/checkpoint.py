"""Checkpoints: when to save, what goes in, atomic writes, rotation, and finding where to resume.

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
DeepSpeed state) is first checked to hold nothing but tensors and plain data (`safety.check_pickles`), because
Accelerate skips a bad RNG file silently and DeepSpeed unpickles with `weights_only=False`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from alexdist import faults, universal
from alexdist.config import CheckpointConfig, Recipe, dump_yaml, flatten
from alexdist.distributed import any_rank, from_main, plain_module
from alexdist.errors import AlexdistError, CheckpointError, DivergedError, SetupError, brief
from alexdist.fileio import fsync_dir, fsync_tree
from alexdist.fsdp import DCP_DIR, load_sharded, local, save_sharded
from alexdist.manifest import damage, write_manifest
from alexdist.metrics import agree_buffers
from alexdist.safety import check_pickles

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
    best_acc: float = -1.0
    best_epoch: int = 0
    test_acc: float | None = None  # test accuracy measured at exactly this step, if any
    test_loss: float | None = None
    wandb_run_id: str | None = None
    train_time_s: float = 0.0
    time_to_target_s: float | None = None  # training time until test accuracy first reached tracking.target_acc
    epoch_to_target: int | None = None
    target_reached: bool = False  # train.stop_at_acc was reached: the run is over
    classes: list[str] = field(default_factory=list)  # the data's class names (the model's head size)
    images_per_s: list[float] = field(default_factory=list)


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Only renamed (`step-*`) directories with a trainer state count."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def read_state(path: Path) -> TrainState:
    data = json.loads((Path(path) / STATE_FILE).read_text())
    known = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in data.items() if k in known})


def save_due(cfg: CheckpointConfig, steps_per_epoch: int, global_step: int, step_in_epoch: int, *,
             epoch_end: bool = False, stopping: bool = False) -> bool:
    """The checkpoint policy. Asked after every optimizer step (`epoch_end` and `stopping` false), after each
    epoch's evaluation (`epoch_end`: the epoch is complete) and when the run stops here (`stopping`: a stop
    request, or the run's last step):
    - a run that stops always leaves a checkpoint of where it stopped;
    - after an epoch's evaluation: if checkpoint.epoch_end (the checkpoint then records the test accuracy);
    - after a step: every checkpoint.every_steps steps, unless this step ends an epoch that is saved after its
      evaluation anyway."""
    if stopping:
        return True
    if epoch_end:
        return cfg.epoch_end
    saved_after_eval = cfg.epoch_end and step_in_epoch == steps_per_epoch
    return bool(cfg.every_steps) and global_step % cfg.every_steps == 0 and not saved_after_eval


def keep_after_rotation(checkpoints: list[tuple[int, float | None]], keep: int) -> set[int]:
    """The steps rotation keeps, from (step, test accuracy or None) oldest first: the newest `keep`, plus the
    best by test accuracy (the later one on ties)."""
    kept = {step for step, _ in checkpoints[-keep:]}
    scored = [(acc, step) for step, acc in checkpoints if acc is not None]
    if scored:
        kept.add(max(scored)[1])
    return kept


class Checkpointer:
    """Owns the checkpoint policy of one run. Every method is called on every rank, in the same order.

    `snapshot` brings the TrainState up to date just before a save (the epoch's sums agreed over ranks, the
    training time): it is only called when a checkpoint is written, because agreeing the sums is a collective.
    """

    def __init__(self, accelerator, recipe: Recipe, model: torch.nn.Module, steps_per_epoch: int,
                 snapshot: Callable[[TrainState], None] = lambda state: None,
                 sharded_optimizer: torch.optim.Optimizer | None = None):
        self.acc = accelerator
        self.model = model
        # FSDP: model and optimizer are not Accelerate's; they go through DCP, every rank writing its shards.
        self.sharded_optimizer = sharded_optimizer
        self.recipe = recipe
        self.cfg = recipe.checkpoint
        self.steps_per_epoch = steps_per_epoch
        self.snapshot = snapshot
        self.root = Path(recipe.output_dir) / "checkpoints"
        self._step = 0  # the step being saved
        self._ddp_weights_hooks()

    # -- when ---------------------------------------------------------------------------------------------
    def due(self, state: TrainState, *, epoch_end: bool = False, stopping: bool = False) -> bool:
        return save_due(self.cfg, self.steps_per_epoch, state.global_step, state.step_in_epoch,
                        epoch_end=epoch_end, stopping=stopping)

    def maybe_save(self, state: TrainState, *, epoch_end: bool = False, stopping: bool = False) -> Path | None:
        """Save if the policy says so (see `due`); the checkpoint's path, or None."""
        if not self.due(state, epoch_end=epoch_end, stopping=stopping):
            return None
        self.snapshot(state)
        return self.save(state)

    def latest(self) -> str | None:
        found = complete_checkpoints(self.recipe.output_dir)
        return str(found[-1]) if found else None

    # -- resume -------------------------------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        """Where to resume from (None: a fresh start), decided on rank 0 and handed to every rank (a collective):
        one look at the shared filesystem, so a stale listing on another node cannot make the ranks disagree."""
        choice = None
        if self.acc.is_main_process:
            try:
                choice = self._choose_resume()
            except AlexdistError as exc:
                choice = exc
        choice = from_main(self.acc, choice)
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

    def load(self, path: Path, strategy: str, world: int) -> TrainState:
        state = read_state(path)
        if state.strategy != strategy:
            raise SetupError(
                f"checkpoint {path} was written by {state.strategy}, this run uses {strategy}; resume with "
                f"distributed.strategy={state.strategy}, or export the weights (python -m alexdist.export) and start "
                f"fresh"
            )
        # Another world size: DCP reshards FSDP checkpoints itself; ZeRO-1/2 go through a universal copy.
        moved = strategy == "deepspeed" and state.world_size != world
        if moved and (refused := universal.refusal(path, state.world_size, world, state.zero_stage or 0)):
            raise refused
        changed = config_changes(path, self.recipe)
        if changed and not self.cfg.allow_config_change:
            raise CheckpointError(
                f"checkpoint {path} was trained with another model or data ({'; '.join(changed)}); resume with "
                f"the checkpoint's values, choose another output_dir, or set checkpoint.allow_config_change=true "
                f"if the change is on purpose"
            )
        check_pickles(path)
        if moved:
            universal.load_on_this_world_size(self.acc, self.model, path)
            return state
        try:
            self.acc.load_state(str(path))
            if self.sharded_optimizer is not None:
                load_sharded(self.model, self.sharded_optimizer, path / DCP_DIR)
        except AlexdistError:
            raise
        except Exception as exc:  # shapes of another model, a truncated shard, a missing file...
            raise CheckpointError(
                f"could not load checkpoint {path} into this run ({brief(exc)}); resume from "
                f"another checkpoint (checkpoint.resume=PATH) or start fresh in another output_dir"
            ) from None
        return state

    # -- save ---------------------------------------------------------------------------------------------
    def save(self, state: TrainState) -> Path | None:
        final = self.root / f"step-{state.global_step:07d}"
        # e.g. an epoch end that is also an every_steps boundary. Rank 0 looks; every rank hears its answer.
        exists = self.acc.is_main_process and final.exists()
        if any_rank(self.acc, torch.tensor([1.0 if exists else 0.0], device=self.acc.device))[0]:
            return None
        if not self._agree(all_finite(plain_module(self.acc, self.model).state_dict().values())):
            raise DivergedError(
                f"the weights hold NaN/inf at step {state.global_step}: not saving them over the good checkpoints "
                f"in {self.root}; lower optim.lr or set train.grad_clip and resume from the last checkpoint"
            )
        step, out = state.global_step, self.recipe.output_dir
        self._step = step
        tmp = self.root / f".tmp-step-{step:07d}"
        error: OSError | None = None
        try:
            if self.acc.is_main_process:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in [*self.root.glob(".tmp-step-*"), *self.root.glob(".del-step-*"),
                              *self.root.glob(".universal-step-*")]:
                    shutil.rmtree(stale, ignore_errors=True)  # left by a crash during an earlier save or load
                tmp.mkdir()
        except OSError as exc:
            error = exc
        self._raise_if_failed(error, tmp, step)  # a collective: no rank writes before the directory exists
        if self.sharded_optimizer is not None:
            # FSDP never syncs buffers, and DCP writes a replicated (plain) tensor from whichever rank its
            # planner picks: the BatchNorm statistics saved must be rank 0's, as DDP saves and evaluation uses.
            # The other ranks' running statistics are never used before the next such broadcast. (A collective:
            # here, where every rank arrives.)
            agree_buffers(self.acc, self.model, deepspeed=False)
        error = self._write(tmp, state)
        self._raise_if_failed(error, tmp, step)  # also: every rank's files are on disk
        faults.kill_point("save.before_rename", step, out)
        if self.acc.is_main_process:
            write_manifest(tmp)
            os.replace(tmp, final)
            fsync_dir(self.root)
            faults.kill_point("save.after_rename", step, out)
            self._rotate()
        self.acc.wait_for_everyone()
        return final

    def _write(self, tmp: Path, state: TrainState) -> OSError | None:
        """Every file of the checkpoint into `tmp`, this rank's part; the error that stopped it, if any."""
        step, out = state.global_step, self.recipe.output_dir
        try:
            faults.kill_point("save.begin", step, out)
            if self.sharded_optimizer is not None:  # a collective, first: DCP agrees on failures itself
                save_sharded(self.model, self.sharded_optimizer, tmp / DCP_DIR)
                faults.kill_point("save.weights", step, out)
            faults.disk_full_point(step)
            self.acc.save_state(str(tmp))
            faults.kill_point("save.state", step, out)
            if self.acc.is_main_process:
                (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")  # tmp/: atomic as a whole
                (tmp / "config.yaml").write_text(dump_yaml(self.recipe))
            # Every rank (on a network filesystem only the writer's node can flush its files); another rank may
            # rename one of its files away meanwhile: that one is its writer's to flush.
            fsync_tree(tmp, missing_ok=True)
        except OSError as exc:
            return exc
        return None

    def _agree(self, ok: bool) -> bool:
        """True on every rank if `ok` holds on every rank (a collective)."""
        return not any_rank(self.acc, torch.tensor([0.0 if ok else 1.0], device=self.acc.device))[0]

    def _raise_if_failed(self, error: OSError | None, tmp: Path, step: int) -> None:
        if self._agree(error is None):
            return
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = complete_checkpoints(self.recipe.output_dir)
        mine = f"{error.strerror or error} ({error.filename})" if error else None
        if self.acc.num_processes == 1:
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
        keep = keep_after_rotation([(_step_of(p), read_state(p).test_acc) for p in ckpts], self.cfg.keep)
        for p in ckpts:
            if _step_of(p) not in keep:
                doomed = p.with_name(f".del-{p.name}")
                os.replace(p, doomed)  # atomic: the checkpoint is gone from resume's view in one step
                faults.kill_point("save.rotate", self._step, self.recipe.output_dir)
                shutil.rmtree(doomed, ignore_errors=True)

    # -- DDP weights as sharded safetensors ------------------------------------------------------------------
    def _ddp_weights_hooks(self) -> None:
        """Accelerate's save_state writes one unsharded file with DDP's `module.` names; we write shards with the
        model's own names instead (the same for 1 or N processes, so a checkpoint moves between world sizes)."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.DEEPSPEED or self.sharded_optimizer is not None:
            return
        from huggingface_hub import load_torch_model, save_torch_state_dict

        def save_hook(models, weights, output_dir):
            for m in models:
                if self.acc.is_main_process:  # DDP ranks hold identical weights: one writer
                    save_torch_state_dict(
                        plain_module(self.acc, m).state_dict(), output_dir, max_shard_size=self.cfg.max_shard_size
                    )
                    faults.kill_point("save.weights", self._step, self.recipe.output_dir)
            weights.clear()

        def load_hook(models, input_dir):
            for m in models:
                load_torch_model(plain_module(self.acc, m), input_dir, strict=True, map_location="cpu")
            models.clear()

        self.acc.register_save_state_pre_hook(save_hook)
        self.acc.register_load_state_pre_hook(load_hook)


# Recipe keys a resumed run must share with its checkpoint: others (epochs, lr, ...) may change on purpose.
RUN_DEFINING = ("model.name", "model.width_mult", "model.input_size", "data.source", "data.revision",
                "data.synthetic_train", "data.synthetic_test")


def config_changes(checkpoint: Path, recipe: Recipe) -> list[str]:
    """`key: saved -> now` for each run-defining key that differs from the checkpoint's config.yaml."""
    saved_file = Path(checkpoint) / "config.yaml"
    if not saved_file.is_file():
        return []
    saved = flatten(yaml.safe_load(saved_file.read_text()) or {})
    now = flatten(recipe.to_dict())
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in RUN_DEFINING if saved.get(k) != now.get(k)]


def all_finite(tensors) -> bool:
    """Whether this rank's values are finite (its shard of an FSDP parameter)."""
    return all(bool(torch.isfinite(local(t).detach()).all()) for t in tensors if t.is_floating_point())
