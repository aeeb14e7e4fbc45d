"""What differs between DDP, DeepSpeed ZeRO and FSDP2: one object per strategy, behind this interface.

The loop, the Checkpointer and export hold a `Strategy` and call it; none of them asks which one it holds. To
see what one strategy does differently, read its file: `ddp.py` (the reference: every method's default here
is DDP's behaviour), `deepspeed.py`, `fsdp.py`.

- building: what it refuses (`refuse_unsupported`), the Accelerator's arguments (and `confirm_accelerator` that
  it runs this strategy), the model before its optimizer exists (`shard`), `prepare`;
- a step: gradient sync under accumulation, who clips, who detects a skipped step, where a small batch's
  gradient is seen (the noise scale);
- evaluation and the final weights: whether forwards are collectives, the full state dict;
- checkpoints: the backend (safetensors shards, ZeRO partitions, DCP), moving to another world size, and the
  offline consolidation `alexdist export` uses.

The registry (distributed/strategies.py) imports the three and picks one (`resolve_strategy`); this base
imports none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from alexdist.config import Recipe
from alexdist.errors import AlexdistError, SetupError

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Strategy:
    """The interface, with DDP's behaviour as the default of every method."""

    name: ClassVar[str]
    zero_stage: int | None = None
    # Every forward gathers parameters from the other ranks (a collective): ranks must run the same forwards.
    sharded_forward: ClassVar[bool] = False
    # Every rank holds whole parameters: rank checksums compare, an EMA can be kept.
    whole_weights: ClassVar[bool] = True
    # The strategy's engine runs the optimizer step itself, inside backward, and decides whether to skip it.
    engine_steps: ClassVar[bool] = False
    # The strategy's engine clips gradients itself (train.grad_clip is handed to it).
    clips_itself: ClassVar[bool] = False
    # Extra fp32 copies of the weights a checkpoint holds beyond the weights (DeepSpeed's masters).
    master_copies: ClassVar[int] = 0

    def describe(self) -> str:
        return self.name

    # -- building ----------------------------------------------------------------------------------------------
    def refuse_unsupported(self, recipe: Recipe) -> None:
        """Refuse, in one line, what this strategy cannot run (before any work)."""
        if recipe.model.sync_bn and not torch.cuda.is_available():
            raise SetupError("model.sync_bn needs GPUs (torch's SyncBatchNorm layers only work with GPU modules); "
                             "drop model.sync_bn on a CPU")

    def accelerator_kwargs(self, recipe: Recipe) -> dict:
        """The Accelerator's strategy-specific arguments."""
        from alexdist.distributed.accelerator import amp_mode

        # `cpu=True` is what makes Accelerate treat gloo ranks as MULTI_CPU and wrap the model in DDP; the gloo
        # backend alone forms the group but leaves the model unwrapped (no gradient sync).
        return {"cpu": not torch.cuda.is_available(), "mixed_precision": amp_mode(recipe.precision),
                "gradient_accumulation_steps": recipe.train.grad_accum}

    def confirm_accelerator(self, accelerator) -> None:
        """After the Accelerator is built: that it runs this strategy."""

    def compute_dtype(self, precision: str) -> torch.dtype:
        """The dtype of the model's inputs (and, for fp64, of its parameters): autocast does the rest."""
        return torch.float64 if precision == "fp64" else torch.float32

    def fp32_batchnorm(self, precision: str, requested: bool) -> bool:
        """Whether BatchNorm computes in fp32 (precision.FP32BatchNorm2d): under autocast when speed.bn_fp32."""
        return precision in HALF and requested

    def shard(self, model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
        """The model as the optimizer will see it, before the optimizer exists."""
        if recipe.model.sync_bn:  # the layers DDP's all-reduce then keeps in step (speed.bn_fp32 does not apply)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if recipe.speed.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare(self, accelerator, model, optimizer, scheduler, recipe: Recipe):
        """(model, optimizer, scheduler) ready to train, Accelerate's wrappers included."""
        return accelerator.prepare(model, optimizer, scheduler)

    # -- a step ------------------------------------------------------------------------------------------------
    def set_gradient_sync(self, model, sync: bool) -> None:
        """Before a micro-batch's backward: whether its gradients are reduced (only the step's last is).
        DDP: Accelerate's `accumulate` does it (`no_sync`)."""

    def gradient_probe(self, accelerator, model, recipe: Recipe):
        """What sees a small batch's gradient for the noise scale (distributed/gradient_probe.py), or a string: why
        nothing can here. DDP: the first micro-batch under accumulation, else its communication hook."""
        from alexdist.distributed.gradient_probe import AccumulationProbe, CommHookProbe, python_reducer

        t = recipe.train
        if recipe.model.sync_bn and accelerator.num_processes >= 2:
            return ("model.sync_bn normalises every rank's batch with all ranks' statistics, and its backward mixes "
                    "their gradients: no rank holds one small batch's gradient (drop model.sync_bn to measure it)")
        if t.grad_accum >= 2:
            return AccumulationProbe(accelerator.device, t.batch_size, t.grad_accum)
        if accelerator.num_processes >= 2:
            ddp = getattr(model, "_orig_mod", model)  # under torch.compile, DDP sits inside the compiled module
            if python_reducer(ddp):
                return ("torch._dynamo.config.optimize_ddp='python_reducer' hands DDP's communication hook one "
                        "parameter at a time, not the buckets the probe reads; leave optimize_ddp at its default or "
                        "set train.grad_accum >= 2")
            return CommHookProbe(accelerator.device, ddp, t.batch_size)
        return "one process without accumulation sees one batch size per step (set train.grad_accum >= 2)"

    def engine_skipped(self, optimizer) -> bool | None:
        """Whether the strategy's own engine skipped this step (an overflow it detected); None: it has no say."""
        return None

    def backward_failure(self, exc: BaseException) -> str | None:
        """Why a backward that raised means the run diverged (an engine giving up), or None."""
        return None

    # -- evaluation and the final weights ------------------------------------------------------------------
    def final_weights(self, accelerator, model, precision: str) -> dict[str, torch.Tensor]:
        """The whole model's state dict for the weights file and export (rank 0; a collective)."""
        from alexdist.distributed.accelerator import unwrap

        return unwrap(accelerator, model).state_dict()  # what Accelerate's get_state_dict does for DDP

    def ema_refusal(self, precision: str) -> str | None:
        """Why train.ema_decay cannot run here, or None."""
        return None

    # -- checkpoints ---------------------------------------------------------------------------------------
    def register_checkpoint_hooks(self, accelerator, max_shard_size: str, after_weights) -> None:
        """Hooks into Accelerate's save_state/load_state, if the strategy writes its weights itself."""

    def before_save(self, accelerator, model) -> None:
        """Before a checkpoint is written (a collective, on every rank)."""

    def save_sharded(self, accelerator, model, optimizer, directory: Path) -> bool:
        """Write what Accelerate's save_state does not (every rank its shards); whether weights were written."""
        return False

    def resume_refusal(self, path: Path, saved_world: int, world: int) -> AlexdistError | None:
        """Why a checkpoint written on `saved_world` processes cannot resume on `world`, or None."""
        return None

    def load_checkpoint(self, accelerator, model, optimizer, path: Path, saved_world: int) -> None:
        """Load weights, optimizer, scheduler and RNG states (on any world size the strategy allows)."""
        accelerator.load_state(str(path))

    @classmethod
    def owns_checkpoint(cls, path: Path) -> bool:
        """Whether a checkpoint directory holds this strategy's files (for `alexdist export`)."""
        return False

    @classmethod
    def consolidate(cls, path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights from one of this strategy's checkpoints, in one process, no group."""
        raise NotImplementedError
