"""eval.val_checks: evaluating the validation split inside an epoch, so that the step at which a run reaches its
target (tracking.time_to_acc, train.stop_at_acc) is known to a fraction of an epoch rather than to one epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from alexdist.config.base import Section

if TYPE_CHECKING:
    from alexdist.config.schema import Recipe


class ValChecksConfig(Section):
    per_epoch: int = Field(
        default=1,
        ge=1,
        description=(
            "Validation evaluations per epoch, the epoch end's included (1: only there). With more, the validation "
            "split (data.val_split, required) is evaluated after steps spread evenly over the epoch, every step where "
            "the epoch has fewer; each is a `val_check` event (loss, accuracy, the noise scale's terms) and can reach "
            "train.stop_at_acc and tracking.time_to_acc there. The steps follow from the step number alone, so every "
            "process and a resumed run evaluate at the same ones; the training is the same as without them."
        ),
    )
    within: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "Start the in-epoch evaluations only once a validation accuracy is within this of the target "
            "(tracking.time_to_acc, else train.stop_at_acc), e.g. 0.01 for one point; before, only epoch ends "
            "evaluate. None: from the first epoch."
        ),
    )


def recipe_target(recipe: Recipe) -> float | None:
    """The accuracy whose crossing a run records: tracking.time_to_acc, else train.stop_at_acc."""
    return recipe.tracking.time_to_acc or recipe.train.stop_at_acc


def val_checks_problem(recipe: Recipe) -> str | None:
    """What is wrong with eval.val_checks given the rest of the recipe, in one line, or None: in-epoch
    evaluations need a validation split (the test set never selects anything mid-run), and `within` a target.
    Both follow from the recipe alone, so they are refused as it loads, before a run touches its output_dir."""
    cfg = recipe.eval.val_checks
    if cfg.per_epoch > 1 and recipe.data.val_split is None:
        return (f"eval.val_checks.per_epoch={cfg.per_epoch} evaluates the validation split inside each epoch: set "
                f"data.val_split (e.g. 0.1), or eval.val_checks.per_epoch=1")
    if cfg.within is not None and recipe_target(recipe) is None:
        return ("eval.val_checks.within starts the in-epoch evaluations near a target: set tracking.time_to_acc or "
                "train.stop_at_acc, or leave eval.val_checks.within unset")
    return None
