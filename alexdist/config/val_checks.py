"""eval.val_checks: evaluating the validation split inside an epoch, so that the step at which a run reaches its
target (tracking.time_to_acc, train.stop_at_acc) is known to a fraction of an epoch rather than to one epoch."""

from __future__ import annotations

from pydantic import Field

from alexdist.config.base import Section


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
