"""Counting host syncs: the points where the host waits for the device.

On CUDA, torch's own sync debug mode reports each one as a warning. On a CPU there is no device to wait for, so
the calls that would sync on CUDA are counted instead: reading a value (`item`, `tolist`, `bool`, `float`,
`int`), copying to the host (`cpu`, `numpy`), building a device tensor from host data (`torch.tensor(...,
device=...)`). Used by tests/unit/test_host_syncs.py (CPU) and the GPU check (both).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

SYNCING_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


class SyncCounter:
    """Counts the host-sync-capable calls made while `active`, whoever makes them (alexdist, Accelerate,
    DeepSpeed, torch). `patch(obj, name, value)` installs a wrapper (pytest's monkeypatch.setattr, or setattr
    with `restore()` afterwards)."""

    def __init__(self, patch: Callable | None = None):
        self.calls: list[str] = []
        self.active = False
        self._saved: list[tuple[object, str, object]] = []
        patch = patch or self._setattr
        for name in SYNCING_METHODS:
            patch(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        tensor = torch.tensor

        def counted_tensor(*args, **kwargs):
            if kwargs.get("device") is not None and self.active:
                self.calls.append("torch.tensor(..., device=...)")
            return tensor(*args, **kwargs)

        patch(torch, "tensor", counted_tensor)

    def _setattr(self, obj, name, value) -> None:
        self._saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def restore(self) -> None:
        for obj, name, value in reversed(self._saved):
            setattr(obj, name, value)
        self._saved.clear()

    def _wrap(self, name, original):
        def wrapper(t, *args, **kwargs):
            if self.active:
                self.calls.append(f"Tensor.{name}")
            return original(t, *args, **kwargs)
        return wrapper


def count_syncs(fn: Callable[[], object]) -> list[str]:
    """The host syncs `fn()` makes: CUDA's sync debug mode on a GPU, SyncCounter on a CPU."""
    if torch.cuda.is_available():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    counter = SyncCounter()
    counter.active = True
    try:
        fn()
    finally:
        counter.active = False
        counter.restore()
    return counter.calls
