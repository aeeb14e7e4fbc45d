"""Which trackers a run logs to (Accelerate's `log_with`), and W&B's mode: online with a key for its server, else
offline."""

from __future__ import annotations

import json
import netrc
import os
from typing import TYPE_CHECKING, Any

from alexdist.config import Recipe
from alexdist.errors import SetupError

if TYPE_CHECKING:
    import wandb


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
    """Whether wandb.init would find a key for the server it talks to: WANDB_BASE_URL, else the one `wandb login
    --host` saved in wandb's settings file, else wandb's default. Reads files only, never the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    fallback = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk.lib import wbauth  # what wandb.login reads (0.31; older releases lack it)
    except ImportError:  # an older wandb, or none (the run then stops on the missing package)
        return _netrc_key(fallback)
    try:
        settings = _wandb_settings()
        return bool(settings.api_key or wbauth.read_netrc_auth(host=wbauth.HostUrl(settings.base_url)))
    except AuthenticationError:  # a key W&B refuses: online, where wandb.init says what is wrong with it
        return True
    except ValueError:  # an invalid server address or setting (pydantic's errors too): nothing to go online to
        return False
    except AttributeError:  # a wandb whose settings API differs from 0.31's
        return _netrc_key(fallback)


def _wandb_settings() -> wandb.Settings:
    """wandb's settings as wandb.init loads them (its settings files, then WANDB_* variables), without the
    process-wide W&B session: variables set after this (WANDB_MODE by RunLog) still reach wandb.init."""
    from pathlib import Path

    import wandb

    settings = wandb.Settings(silent=True)  # no "Loading settings from" line of its own
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    settings.settings_system = str(Path(config_dir or "~/.config/wandb").expanduser() / "settings")
    settings.update_from_system_settings()
    settings.update_from_env_vars({k: v for k, v in os.environ.items() if k != "WANDB_MODE"})  # may say auto
    return settings


def _netrc_key(url: str) -> bool:
    host = url.split("://", 1)[-1].split("/", 1)[0]
    try:
        auth = netrc.netrc().authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])
