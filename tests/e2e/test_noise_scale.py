"""The gradient noise scale (training/noise_scale.py) on a problem whose answer is known in closed form, through
the probes that see the small batch's gradient in training (distributed/gradient_probe.py): the first of several
accumulated micro-batches (unit), and DDP's communication hook on 2 gloo ranks (e2e).

The problem and its closed form (B_noise = 26) are in tests/linear_regression.py.
"""

from __future__ import annotations

import pytest
from helpers import worker_report
from linear_regression import STEPS, TOLERANCE


@pytest.mark.learned
def test_ddp_local_gradients_seen_by_the_communication_hook_measure_the_noise_scale():
    r = worker_report("noise_scale_worker.py")
    print(f"\nDDP 2 ranks x 8: B_simple {r['estimate']:.2f}, closed form {r['truth']:.2f}")
    assert r["steps"] == STEPS and r["estimate"] == pytest.approx(r["truth"], rel=TOLERANCE)


