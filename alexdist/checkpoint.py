"""Checkpoints: when to save, what goes in, atomic writes, rotation, and finding where to resume.

Layout of one checkpoint (`output_dir/checkpoints/step-NNNNNNN/`):
    model.safetensors | model-0000i-of-0000n.safetensors + index   DDP weights (unwrapped names), sharded
    pytorch_model/ + latest                                          DeepSpeed's partitioned files (ZeRO)
    optimizer.bin, scheduler.bin, scaler.pt                          Accelerate's save_state
    random_states_<rank>.pkl                                         every rank's RNG state
    trainer_state.json                                               data position, best, tracker run id, ...
    config.yaml                                                      the resolved recipe

A checkpoint is written under `.tmp-step-NNNNNNN` and renamed when every rank has finished, so a directory
named `step-*` is always complete; a crash mid-save leaves only a `.tmp-*` that resume ignores and the next
save removes. Rotation keeps the newest `checkpoint.keep` plus the best by test accuracy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alexdist.config import Recipe, dump_yaml
from alexdist.errors import SetupError

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Everything besides tensors that a run needs to continue exactly where it stopped."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # 0-based epoch in progress (the next one when step_in_epoch == 0)
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    samples_in_epoch: int = 0  # global samples consumed in `epoch` (= step_in_epoch x effective batch)
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


class Checkpointer:
    """Owns the checkpoint policy of one run. Every method is called on every rank, in the same order."""

    def __init__(self, accelerator, recipe: Recipe):
        self.acc = accelerator
        self.recipe = recipe
        self.cfg = recipe.checkpoint
        self.root = Path(recipe.output_dir) / "checkpoints"
        self._ddp_weights_hooks()

    # -- when ---------------------------------------------------------------------------------------------
    def due_at_step(self, step: int) -> bool:
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    # -- resume -------------------------------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        r = self.cfg.resume
        if r == "never":
            if complete_checkpoints(self.recipe.output_dir):
                # Never overwrite or mix with an earlier run's checkpoints.
                raise SetupError(
                    f"checkpoint.resume=never but {self.root} holds an earlier run's checkpoints; choose another "
                    f"output_dir, or resume it with checkpoint.resume=auto"
                )
            return None
        if r == "auto":
            found = complete_checkpoints(self.recipe.output_dir)
            return found[-1] if found else None
        path = Path(r)
        if not (path / STATE_FILE).is_file():
            raise SetupError(
                f"checkpoint.resume='{r}' is not a complete checkpoint (no {STATE_FILE}); give a "
                f"{self.root}/step-* directory, 'auto' or 'never'"
            )
        return path

    def load(self, path: Path, strategy: str, world: int) -> TrainState:
        state = read_state(path)
        if state.strategy != strategy:
            raise SetupError(
                f"checkpoint {path} was written by {state.strategy}, this run uses {strategy}; resume with "
                f"distributed.strategy={state.strategy}, or export the weights (python -m alexdist.export) and start fresh"
            )
        if strategy == "deepspeed" and state.world_size != world:
            raise SetupError(
                f"checkpoint {path} holds ZeRO partitions for {state.world_size} processes, this run has {world}; "
                f"resume with {state.world_size} processes, or convert it to plain weights with `python -m "
                f"alexdist.export {path} OUT.safetensors` (the optimizer state does not carry over)"
            )
        self.acc.load_state(str(path))
        return state

    # -- save ---------------------------------------------------------------------------------------------
    def save(self, state: TrainState) -> Path | None:
        final = self.root / f"step-{state.global_step:07d}"
        if final.exists():  # e.g. an epoch end that is also an every_steps boundary
            return None
        tmp = self.root / f".tmp-step-{state.global_step:07d}"
        if self.acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):  # left by a crash during an earlier save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        if self.acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
            (tmp / "config.yaml").write_text(dump_yaml(self.recipe))
            _fsync_tree(tmp)
        self.acc.wait_for_everyone()  # every rank's files are on disk
        if self.acc.is_main_process:
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._rotate()
        self.acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        ckpts = complete_checkpoints(self.recipe.output_dir)
        keep = set(ckpts[-self.cfg.keep :])
        scored = [(s.test_acc, _step_of(p), p) for p in ckpts if (s := read_state(p)).test_acc is not None]
        if scored:
            keep.add(max(scored)[2])  # best accuracy; the later one on ties
        for p in ckpts:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # -- DDP weights as sharded safetensors ------------------------------------------------------------------
    def _ddp_weights_hooks(self) -> None:
        """Accelerate's save_state writes one unsharded file with DDP's `module.` names; we write shards with the
        model's own names instead (the same for 1 or N processes, so a checkpoint moves between world sizes)."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.DEEPSPEED:
            return
        from huggingface_hub import load_torch_model, save_torch_state_dict

        def save_hook(models, weights, output_dir):
            for m in models:
                if self.acc.is_main_process:  # DDP ranks hold identical weights: one writer
                    save_torch_state_dict(
                        self.acc.unwrap_model(m).state_dict(), output_dir, max_shard_size=self.cfg.max_shard_size
                    )
            weights.clear()

        def load_hook(models, input_dir):
            for m in models:
                load_torch_model(self.acc.unwrap_model(m), input_dir, strict=True, map_location="cpu")
            models.clear()

        self.acc.register_save_state_pre_hook(save_hook)
        self.acc.register_load_state_pre_hook(load_hook)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))
