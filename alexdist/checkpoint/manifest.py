"""A checkpoint's manifest: every file's size and SHA-256, written when the checkpoint is complete.

It tells a damaged checkpoint (a file truncated or altered after the save: a disk fault, a copy cut short) from
a good one before anything is loaded, so `checkpoint.resume: auto` can fall back to the previous checkpoint
instead of failing every requeue. It guards against accidents, not attackers: whoever can rewrite a file can
rewrite the manifest (unsafe pickles are refused separately, see safety.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from alexdist.fileio import atomic_path

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(checkpoint: Path) -> list[Path]:
    """The checkpoint's files, less the manifest and a temporary that a crash left (fileio.atomic_path's)."""
    return sorted(p for p in checkpoint.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not (p.name.startswith(".") and ".tmp-" in p.name))


def write_manifest(checkpoint: str | Path, also: dict[str, bytes] | None = None) -> None:
    """Record every file of a finished checkpoint directory (sizes and checksums), synced to disk. `also`: a
    file's next content, accepted beside the present one (a file about to be replaced: no moment in between
    where the manifest and the files disagree)."""
    checkpoint = Path(checkpoint)
    files: dict[str, list] = {str(p.relative_to(checkpoint)): [p.stat().st_size, _sha256(p)]
                              for p in _files(checkpoint)}
    for name, content in (also or {}).items():
        files[name] = [files[name], [len(content), hashlib.sha256(content).hexdigest()]]
    with atomic_path(checkpoint / MANIFEST) as tmp, open(tmp, "w") as fh:  # rewritten in place when amended
        json.dump({"files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def damage(checkpoint: str | Path) -> str | None:
    """What is wrong with a checkpoint according to its manifest, or None (also when it has none: written by an
    alexdist before manifests, nothing to check)."""
    checkpoint = Path(checkpoint)
    path = checkpoint / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, spec in files.items():
        f = checkpoint / name
        if not f.is_file():
            return f"{name} is missing"
        accepted = spec if isinstance(spec[0], list) else [spec]  # [size, sha256], or several (write_manifest)
        if f.stat().st_size not in [size for size, _ in accepted]:
            return f"{name} has {f.stat().st_size} bytes, {accepted[-1][0]} were saved"
        if _sha256(f) not in [digest for _, digest in accepted]:
            return f"{name} differs from what was saved (checksum)"
    return None
