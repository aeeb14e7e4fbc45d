"""Files that are never seen half-written, with the mode the umask asks for, and a JSONL reader that tolerates the
line being written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from alexdist.errors import CheckpointError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path` in one rename.

    A crash or an exception leaves `path` as it was (the temporary is removed on an exception; a crash leaves
    only the `.tmp-<pid>` file, never a truncated `path`). The temporary keeps the suffix, so libraries that
    look at it (safetensors, PIL) see the right kind of file. `path` is a file, with the mode of `share`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        share(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask. The umask is read where Linux shows it: os.umask
    sets it, which races with other threads creating files."""
    try:
        with open("/proc/self/status") as fh:
            mask = next((int(line.split()[1], 8) for line in fh if line.startswith("Umask:")), None)
    except OSError:
        mask = None
    if mask is None:
        mask = os.umask(0o077)  # meanwhile a file another thread creates is private, never too open
        os.umask(mask)
    return 0o666 & ~mask


def share(path: str | Path) -> None:
    """Give a file `new_file_mode()`: safetensors creates its files 0600 whatever the umask, which on a shared
    disk keeps the team from reading the weights. Best effort: a filesystem without modes (vfat, some FUSE and
    CIFS mounts) or a file of another owner refuses chmod, and that must not fail the write."""
    with contextlib.suppress(OSError, NotImplementedError):
        os.chmod(path, new_file_mode())


def share_tree(path: Path, missing_ok: bool = False) -> None:
    """`share` every file under `path`; with `missing_ok`, a file renamed away meanwhile is passed over."""
    mode = new_file_mode()
    for root, _, files in os.walk(path):
        for f in files:
            try:
                os.chmod(os.path.join(root, f), mode)
            except FileNotFoundError:
                if not missing_ok:
                    raise
            except OSError:  # as in `share`: modes are best effort
                pass


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file; a line cut short (a crash, or the line being written right now) is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path, missing_ok: bool = False) -> None:
    """fsync every file and directory under `path` (on a network filesystem: what this node wrote). With
    `missing_ok`, a file that vanishes while the tree is walked (renamed by another process) is passed over."""
    for root, _, files in os.walk(path):
        for f in files:
            try:
                with open(os.path.join(root, f), "rb") as fh:
                    os.fsync(fh.fileno())
            except FileNotFoundError:
                if not missing_ok:
                    raise
        fsync_dir(Path(root))


def check_space(output_dir: str | Path, needed: int,
                what: str = "a new checkpoint beside the last one, plus the final weights") -> None:
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        mib = 2**20
        raise CheckpointError(
            f"'{output_dir}' has {free / mib:.0f} MiB free but this run needs about {needed / mib:.0f} MiB ({what}); "
            f"free space or choose another output_dir"
        )
