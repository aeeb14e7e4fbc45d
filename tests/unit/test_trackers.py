"""Any of Accelerate's trackers beside W&B (tracking.log_with): TensorBoard offline, read back from its event
files, records the same values as metrics.jsonl; a tracker whose package is missing stops the run in one line."""

import pytest

from alexdist.config import load_recipe
from alexdist.errors import SetupError
from alexdist.tracking.trackers import trackers


def test_a_tracker_without_its_package_is_refused_with_the_install_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(SetupError, match="pip install mlflow"):
        trackers(load_recipe("quickstart", ["tracking.log_with=[mlflow]"]))
    assert trackers(load_recipe("quickstart", ["tracking.log_with=[tensorboard]"])) == ["tensorboard"]
    assert trackers(load_recipe("quickstart", ["tracking.wandb=false"])) == []
