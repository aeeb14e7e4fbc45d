"""The gradient noise scale (tracking.noise_scale): McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", appendix A.1, measured from gradients every data-parallel step already has.

A step sees the gradient at two batch sizes: a small one (G_small, from B_small examples: one rank's local
gradient before the all-reduce, or the first of train.grad_accum micro-batches) and the whole step's (G_big, from
B_big = the effective batch). Since E|G_B|^2 = |G|^2 + tr(Sigma)/B, two sizes give unbiased estimates of both
terms:

    |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
    B_simple = tr(Sigma) / |G|^2,  each term averaged (a bias-corrected exponential average over the last
                                   ~WINDOW_EXAMPLES examples) before dividing.

B_simple approximates the critical batch: in their model a run at batch B needs S = S_min (1 + B_noise/B) steps
and E = E_min (1 + B/B_noise) examples. Far above it, more data parallelism buys few steps and burns examples.

Costs: one squared norm of the gradients the step already holds (the all-reduced gradient's norm is the
divergence guard's), summed over ranks inside the step's one all-reduce: no extra collective, no host sync.
Who measures G_small is the strategy's business (Strategy.gradient_probe, distributed/gradient_probe.py): the
first micro-batch under accumulation, else DDP's communication hook.
"""

from __future__ import annotations

import math

# The averages' memory, in examples rather than steps: each step weighs exp(-B_big / WINDOW) of the one after it,
# so every effective batch averages over about the same stretch of training (512 steps at batch 128, 32 at 2048,
# 8 at 8192; MNIST's 54k training images are ~0.8 of it), and a figure read at a given point of training (the
# target's crossing, eval.val_checks) describes the same stretch at every batch. A fixed decay per step (0.99
# until now) held ~100 steps: 13k examples at batch 128 but 800k at 8192, most of a large-batch run.
WINDOW_EXAMPLES = 65_536
# An effective batch this many times the noise scale prints a line: there E = 3 E_min and S = 1.5 S_min, so the
# next doubling of the batch cuts steps by only 1.2x for twice the examples.
WARN_FACTOR = 2.0


class GradientNoiseScale:
    """B_simple from (|G_small|^2, |G_big|^2) pairs, one per optimizer step (host floats): tr(Sigma) and |G|^2 each
    an exponential average over the last ~`window` examples (`decay`: a fixed decay per step instead, for tests
    of the estimator alone)."""

    def __init__(self, b_small: int, b_big: int, window: int = WINDOW_EXAMPLES, decay: float | None = None):
        if not 0 < b_small < b_big:
            raise ValueError(f"the small batch ({b_small}) must be smaller than the big one ({b_big})")
        self.b_small, self.b_big, self.window = b_small, b_big, window
        self.decay = decay if decay is not None else math.exp(-b_big / window)
        self._trace = self._grad_sq = 0.0  # averages of tr(Sigma) and |G|^2, not bias-corrected
        self._weight = 0.0  # the averages' total weight: dividing by it corrects their bias (whatever the decay)
        self.steps = 0

    def update(self, small_sq: float, big_sq: float) -> None:
        """One step's squared norms (of the mean gradient over B_small and over B_big examples)."""
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            return  # a skipped (NaN/inf) step says nothing about the gradient's noise
        bs, bb = self.b_small, self.b_big
        trace = (small_sq - big_sq) / (1 / bs - 1 / bb)
        grad_sq = (bb * big_sq - bs * small_sq) / (bb - bs)
        self._trace = self.decay * self._trace + (1 - self.decay) * trace
        self._grad_sq = self.decay * self._grad_sq + (1 - self.decay) * grad_sq
        self._weight = self.decay * self._weight + (1 - self.decay)
        self.steps += 1

    @property
    def trace(self) -> float | None:
        """tr(Sigma): the per-example gradient variance summed over parameters (bias-corrected average); None
        until positive."""
        return self._settled(self._trace)

    @property
    def grad_sq(self) -> float | None:
        """|G|^2: the true gradient's squared norm (bias-corrected average); None until positive."""
        return self._settled(self._grad_sq)

    @property
    def value(self) -> float | None:
        """B_simple, in examples; None ("not yet settled") before the first step or while either average is not
        positive: each step's two estimates are unbiased but noisy, and early on either can average below zero."""
        if self.trace is None or self.grad_sq is None:
            return None
        return self._trace / self._grad_sq

    def _settled(self, average: float) -> float | None:
        # A variance and a squared norm cannot be negative: a non-positive average is noise, never reported.
        return average / self._weight if self.steps and average > 0 else None

    def terms(self) -> dict:
        """The estimate and its two terms, as logged (`window_examples`: the averages' memory)."""
        return {"noise_scale": self.value, "grad_sq": self.grad_sq, "grad_trace": self.trace,
                "noise_window_examples": self.window}

    def state_dict(self) -> dict:
        """The EMAs, for a checkpoint: a resumed run goes on with the same estimate as an uninterrupted one."""
        return {"trace": self._trace, "grad_sq": self._grad_sq, "weight": self._weight, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        # The small and big batches may differ after a move to another world size: each step's two estimates
        # are unbiased whatever the pair, so the averages carry on (the decay follows the new big batch).
        self._trace, self._grad_sq, self.steps = state["trace"], state["grad_sq"], state["steps"]
        # A checkpoint from before the weight was saved averaged with training's old fixed decay.
        self._weight = state.get("weight", 1 - 0.99 ** self.steps)

    def facts(self) -> dict:
        """What summary.json records."""
        return {"b_simple": self.value, "grad_sq": self.grad_sq, "grad_trace": self.trace, "steps": self.steps,
                "b_small": self.b_small, "b_big": self.b_big, "window_examples": self.window, "ema_decay": self.decay}


def cost_line(effective_batch: int, b_noise: float | None) -> str | None:
    """One line when the effective batch is WARN_FACTOR or more times the measured noise scale: what McCandlish's
    model says that batch costs."""
    if not b_noise or b_noise <= 0 or effective_batch < WARN_FACTOR * b_noise:
        return None
    examples = 1 + effective_batch / b_noise  # E / E_min
    steps = 1 + b_noise / effective_batch  # S / S_min
    return (f"the effective batch {effective_batch} is {effective_batch / b_noise:.1f}x the measured gradient noise "
            f"scale ({b_noise:,.0f}): by McCandlish et al.'s model this run needs ~{examples:.1f}x the examples a "
            f"small batch needs and still {steps:.2f}x the minimum steps; a batch near {b_noise:,.0f} (fewer "
            f"processes or less accumulation) reaches the same loss on fewer examples")
