"""The recipe's settings for how a run runs and what it records: distribution (DDP, DeepSpeed, FSDP2),
checkpoints, tracking, speed options, evaluation extras. Part of the schema (schema.py holds the rest and the
Recipe)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alexdist.config.base import Section
from alexdist.config.val_checks import ValChecksConfig, val_checks_problem


class DeepSpeedConfig(Section):
    """Settings read only by distributed.strategy=deepspeed."""

    zero_stage: Literal[1, 2, 3] = Field(
        default=2,
        description='ZeRO stage: 1 partitions the optimizer state, 2 also the gradients, 3 also the parameters.',
    )
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload: optimizer state in CPU memory")
    fp16_initial_scale_power: int = Field(
        default=16,
        ge=0,
        le=32,
        description=(
            "fp16: dynamic loss scaling starting at 2**initial_scale_power, halved on overflow (after `hysteresis` "
            "overflows), doubled after `loss_scale_window` clean steps, never below min_loss_scale."
        ),
    )
    fp16_loss_scale_window: int = Field(
        default=1000, ge=1,
        description='fp16: clean steps before the loss scale doubles.',
    )
    fp16_hysteresis: int = Field(default=2, ge=1, description='fp16: overflows before the loss scale halves.')
    fp16_min_loss_scale: int = Field(
        default=1, ge=1, description="An int: DeepSpeed validates it as one (0.5 would fail at prepare)."
    )


class DistributedConfig(Section):
    strategy: Literal["auto", "ddp", "deepspeed", "fsdp"] = Field(
        default="auto",
        description=(
            "auto: what the launcher says (`accelerate launch --config_file recipes/accelerate/zero2.yaml` -> "
            "DeepSpeed), else DDP. An explicit value here that disagrees with the launcher stops the run (both are "
            "shown). fsdp: PyTorch's FSDP2 (parameters, gradients and optimizer state sharded; checkpoints reshard on "
            "load)."
        ),
    )
    deepspeed: DeepSpeedConfig = Field(
        default_factory=DeepSpeedConfig,
        description='Settings read only by distributed.strategy=deepspeed.',
    )
    step_timeout_s: int = Field(
        default=300,
        ge=10,
        description=(
            "From the first optimizer step on, a collective that waits longer than this fails the run instead of "
            "hanging: the bound for a rank that hangs, and on NCCL also for one that died (gloo notices a closed "
            "connection at once; NCCL waits for this timeout). A step, an evaluation or a save takes far less."
        ),
    )
    setup_timeout_s: int = Field(
        default=1800,
        ge=10,
        description=(
            "The allowance before the first step: rank 0 decoding the dataset while the others wait, process-group and "
            "NCCL set-up, a first torch.compile or DeepSpeed op build."
        ),
    )


class CheckpointConfig(Section):
    every_steps: int = Field(
        default=0,
        ge=0,
        description="Save every N optimizer steps (0 = only at epoch ends, on stop requests and at the end).",
    )
    at_epoch_end: bool = Field(
        default=True,
        description="Save after every epoch's evaluation (the checkpoint then records its accuracies).",
    )
    keep: int = Field(default=2, ge=1, description="newest checkpoints kept, plus the best by selection accuracy")
    max_shard_size: str = Field(default="2GB", description="DDP weights: safetensors shards no larger than this")
    resume: str = Field(
        default="auto",
        description=(
            "auto: continue from the newest complete checkpoint in output_dir (fresh start if none); never; or a path."
        ),
    )
    allow_config_change: bool = Field(
        default=False,
        description=(
            "Resuming with another model, data or optimizer, or other training settings (optim.*, schedule.*, "
            "train.epochs, train.seed, augment.*, ...) than the checkpoint's is refused unless this is true; the "
            "new settings then apply from the resumed step (docs/checkpoints.md: what a resume may change)."
        ),
    )


TRACKERS = ("wandb", "tensorboard", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


class TrackingConfig(Section):
    log_with: list[Literal[TRACKERS]] = Field(
        default_factory=lambda: ["wandb"],
        description=(
            "Accelerate's trackers to log to, besides metrics.jsonl (always written). W&B also needs tracking.wandb "
            "(the quick off switch); TensorBoard writes to output_dir/tensorboard and works offline."
        ),
    )
    wandb: bool = Field(default=True, description='W&B on or off (with tracking.log_with: [wandb]).')
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = Field(
        default="auto",
        description=(
            "auto: online when an API key is configured, else offline (synced later with `wandb sync`). The WANDB_MODE "
            "environment variable, when set, wins."
        ),
    )
    project: str = Field(default="alexdist", description="The trackers' project (W&B's project).")
    entity: str | None = Field(default=None, description="W&B's entity (user or team); None: your default.")
    group: str | None = Field(default=None, description="W&B's group; None: the recipe's name.")
    tags: list[str] = Field(
        default_factory=list, description="Added to the automatic tags (model, strategy, precision, world size)."
    )
    run_name: str | None = Field(default=None, description="W&B's run name; None: W&B picks one.")
    time_to_acc: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "The summary records the training time and epoch at which the selection accuracy (validation with "
            "data.val_split, else test) first reached this; the run goes on (train.stop_at_acc stops it)."
        ),
    )
    noise_scale: bool = Field(
        default=True,
        description=(
            "The gradient noise scale (McCandlish et al. 2018, B_simple): the critical batch, past which more data "
            "parallelism buys few steps. Measured from gradients the step already has (DDP's local gradients before "
            "the all-reduce, or with one process the first of train.grad_accum micro-batches), logged per epoch and in "
            "summary.json; a run whose effective batch is far above it says what that costs. FSDP2 and ZeRO keep their "
            "local gradients inside their engines, SyncBatchNorm (model.sync_bn) mixes the ranks' gradients, and DDP "
            "under torch's optimize_ddp='python_reducer' takes no communication hook: not measured there, nor with one "
            "process and train.grad_accum=1 (a recipe that sets tracking.noise_scale is told why in one line). None "
            "until the estimate has settled (both of its averages positive), never negative."
        ),
    )
    profile_steps: list[int] | None = Field(
        default=None,
        description=(
            "[start, end]: a torch.profiler trace of optimizer steps start..end (1-based, inclusive) on rank 0, "
            "written to output_dir/profile/ (Chrome trace format, which TensorBoard's profiler plugin reads too)."
        ),
    )

    @field_validator("profile_steps")
    @classmethod
    def _two_steps(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or not 1 <= v[0] <= v[1]):
            raise ValueError("tracking.profile_steps is [start, end] with 1 <= start <= end, e.g. [10, 12]")
        return v


class SpeedConfig(Section):
    """Speed options. Each leaves the training mathematically the same (tests check the loss on CPU)."""

    channels_last: bool = Field(
        default=False,
        description=(
            "Convs in NHWC memory layout: faster with tensor cores (fp16/bf16 on GPUs); usually no gain on a CPU."
        ),
    )
    compile: bool = Field(
        default=False,
        description=(
            "torch.compile (inductor) through Accelerate's dynamo plugin. Costs compile time in the first steps (tens "
            "of seconds on a GPU, 20-30 s for a small model on a 2-core CPU) and again for each new input shape (e.g. "
            "the last evaluation batch)."
        ),
    )
    bn_fp32: bool = Field(
        default=False,
        description=(
            "Under fp16/bf16 autocast BatchNorm already keeps fp32 weights and statistics and accumulates in fp32; "
            "true also runs its arithmetic and output in fp32 (as airbench), at the cost of two casts of every BN "
            "activation. Under DeepSpeed fp16/bf16 it is always on: the engine casts BatchNorm's weights but not its "
            "statistics."
        ),
    )
    data_on_device: bool = Field(
        default=True,
        description=(
            "The whole uint8 dataset lives in device memory (CIFAR-10: 180 MB) and batches are built there. false: "
            "batches are built on the host and copied from pinned memory without blocking (datasets larger than the "
            "device)."
        ),
    )
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = Field(
        default="auto",
        description=(
            "Optimizer kernels. auto: fused (one kernel for all parameters) on CUDA and CPU; foreach batches the "
            "per-parameter updates; for_loop is the plain loop."
        ),
    )
    tf32: bool = Field(
        default=True,
        description=(
            "CUDA only. TF32 tensor cores for fp32 matmuls and convolutions (10-bit mantissa products, fp32 sums: the "
            "usual trade for fp32 training on Ampere and later; false gives IEEE fp32)."
        ),
    )
    cudnn_benchmark: bool = Field(
        default=True,
        description=(
            "CUDA only. cuDNN times its convolution algorithms on the first batch of each shape and keeps the fastest "
            "(fixed 32 px shapes: a one-time cost; not bit-reproducible across runs)."
        ),
    )


class EvalConfig(Section):
    tta: Literal["none", "flip", "flip_translate"] = Field(
        default="none",
        description=(
            "Test-time augmentation (airbench's): each evaluation also reports the test loss and accuracy with logits "
            "averaged over the image and its mirror (flip), plus both shifted one pixel (flip_translate): 2 or 6 "
            "forward passes per image. The plain figures stay the run's `test` loss/acc; TTA's sit beside them."
        ),
    )
    confusion_png: bool = Field(
        default=True,
        description=(
            "A confusion matrix PNG (output_dir/confusion.png) after every evaluation; per-class accuracies and the "
            "matrix are in metrics.jsonl and W&B either way."
        ),
    )
    val_checks: ValChecksConfig = Field(default_factory=ValChecksConfig, description="Validation inside an epoch.")


class CrossSectionRules(Section):
    """The Recipe's base (schema.py): the rules between its sections that concern the settings here."""

    @model_validator(mode="after")
    def _val_checks_fit_the_recipe(self) -> CrossSectionRules:
        if problem := val_checks_problem(self):  # self is the Recipe
            raise ValueError(problem)
        return self
