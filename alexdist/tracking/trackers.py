"""Which trackers a run logs to (Accelerate's `log_with`), and W&B's mode: online with a key, else offline."""

from __future__ import annotations

import json
import netrc
import os
from typing import Any

from alexdist.config import Recipe
from alexdist.errors import SetupError


def wandb_mode(recipe: Recipe) -> str | None:
    """The W&B mode this run uses, or None for no W&B at all."""
    t = recipe.tracking
    return resolve_wandb_mode(t.wandb_mode) if t.wandb and "wandb" in t.log_with else None


# The package each of Accelerate's trackers needs.
_TRACKER_PACKAGE = {"tensorboard": "tensorboard", "comet_ml": "comet_ml", "aim": "aim", "mlflow": "mlflow",
                    "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio",
                    "wandb": "wandb"}


def trackers(recipe: Recipe) -> list[str]:
    """Accelerate's `log_with` for this run: tracking.log_with, W&B only when wandb_mode says so; a tracker
    whose package is missing stops the run before any work (Accelerate would drop it with a log line)."""
    import importlib.util

    wanted = [t for t in dict.fromkeys(recipe.tracking.log_with) if t != "wandb" or wandb_mode(recipe)]
    for t in wanted:
        if importlib.util.find_spec(_TRACKER_PACKAGE[t]) is None:
            raise SetupError(f"tracking.log_with has {t}, which needs its package: pip install {_TRACKER_PACKAGE[t]} "
                             f"(or drop it from tracking.log_with)")
    return wanted


def plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config for trackers that take scalars only (TensorBoard's hparams): lists and None as JSON text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config.items()}


def resolve_wandb_mode(setting: str = "auto") -> str | None:
    """`online`/`offline`, or None for disabled: the WANDB_MODE environment variable wins over `setting`;
    `auto` is online when an API key is configured, else offline (synced later with `wandb sync`)."""
    mode = os.environ.get("WANDB_MODE") or setting
    if mode == "auto":
        mode = "online" if _has_wandb_key() else "offline"
    if mode == "dryrun":  # W&B's old name for offline
        mode = "offline"
    return None if mode == "disabled" else mode


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])
