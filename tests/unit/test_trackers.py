"""Any of Accelerate's trackers beside W&B (tracking.log_with): TensorBoard offline, read back from its event
files, records the same values as metrics.jsonl; a tracker whose package is missing stops the run in one line.
W&B's `auto` mode goes online when wandb has a key for the server it is set to (a self-hosted one included), found
the way wandb.init finds it, without the network."""

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


KEY = "k" * 40  # the shape of a W&B API key
SELF_HOSTED = "https://wandb.example.com"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty home directory and working directory, no W&B variable, and no network: a connection attempt is
    recorded (and refused) so that the test can assert there was none."""
    import os
    import socket

    for name in [n for n in os.environ if n.startswith("WANDB_") or n == "NETRC"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield tmp_path
    assert attempts == []


def _login(home, machine: str, host: str | None = None) -> None:
    """What `wandb login --host HOST` leaves behind: the key in .netrc, the host in wandb's settings file."""
    (home / ".netrc").write_text(f"machine {machine}\n  login user\n  password {KEY}\n")
    (home / ".netrc").chmod(0o600)
    if host:
        (home / ".config" / "wandb").mkdir(parents=True, exist_ok=True)
        (home / ".config" / "wandb" / "settings").write_text(f"[default]\nbase_url = {host}\n")


def test_auto_goes_online_with_the_key_wandb_has_for_the_server_it_is_set_to(home, monkeypatch):
    from alexdist.tracking.trackers import resolve_wandb_mode

    _login(home, "wandb.example.com", SELF_HOSTED)  # `wandb login --host https://wandb.example.com`
    assert resolve_wandb_mode("auto") == "online"
    (home / ".config" / "wandb" / "settings").unlink()
    assert resolve_wandb_mode("auto") == "offline"  # the key is for another server than the default
    monkeypatch.setenv("WANDB_BASE_URL", SELF_HOSTED)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.delenv("WANDB_BASE_URL")
    _login(home, "api.wandb.ai")  # plain `wandb login`: W&B's cloud, still found under its default address
    assert resolve_wandb_mode("auto") == "online"


def test_auto_stays_offline_with_a_key_only_for_another_server(home, monkeypatch):
    from alexdist.tracking.trackers import resolve_wandb_mode

    _login(home, "api.wandb.ai", SELF_HOSTED)  # wandb.init would talk to wandb.example.com, with no key
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_BASE_URL", "https://other.example.com")
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", KEY)  # a key in the environment is used for whichever server
    assert resolve_wandb_mode("auto") == "online"


def test_without_wandbs_own_lookup_the_key_for_wandb_base_url_still_counts(home, monkeypatch):
    """An older wandb has no wandb.sdk.lib.wbauth: .netrc is read for WANDB_BASE_URL's host."""
    import sys

    import wandb.sdk.lib

    from alexdist.tracking.trackers import resolve_wandb_mode

    monkeypatch.delattr(wandb.sdk.lib, "wbauth", raising=False)
    monkeypatch.setitem(sys.modules, "wandb.sdk.lib.wbauth", None)  # importing it raises ImportError
    _login(home, "wandb.example.com")
    monkeypatch.setenv("WANDB_BASE_URL", SELF_HOSTED)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.delenv("WANDB_BASE_URL")
    assert resolve_wandb_mode("auto") == "offline"
