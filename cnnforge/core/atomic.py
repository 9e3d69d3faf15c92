"""Write artifacts under a temporary name, then rename: a crash never leaves half a file.

A rename alone is not enough after a power cut: the file's data and the folder entry that names
it may still sit in the page cache, and the file comes back empty. So the temporary file is
fsynced before the rename and its folder after it. Temporary names carry a random token, not
only the PID: every container sharing a run directory is PID 1.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cnnforge.core.errors import CnnforgeError


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden name beside ``path`` (same suffix, so libraries that check it still accept it),
    unique across processes, hosts and containers."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{tag}-{os.getpid()}-{secrets.token_hex(6)}{path.suffix}")


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk. Folders cannot be opened on Windows,
    where a rename is durable by itself: nothing to do there."""
    folder = Path(path).is_dir()
    if folder and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CnnforgeError(
            f"cannot create folder {folder} ({exc.strerror}); choose another"
        ) from None


@contextlib.contextmanager
def atomic_paths(*paths: Path) -> Iterator[list[Path]]:
    """Yield a temporary sibling of each of ``paths``; once the block ends without an error,
    each is fsynced and renamed over its path, in order, and the folders fsynced. On an error
    none is renamed: the old files stay, every one of them.

    A crash between two renames can still leave the first file new and the second old; what
    this promises is that no error in the block replaces any of them."""
    paths = [Path(p) for p in paths]
    for folder in dict.fromkeys(p.parent for p in paths):
        _make_folder(folder)
    temporaries = [temporary_sibling(p) for p in paths]
    try:
        yield temporaries
        for tmp in temporaries:
            fsync_path(tmp)
        for tmp, path in zip(temporaries, paths, strict=True):
            os.replace(tmp, path)
        for folder in dict.fromkeys(p.parent for p in paths):
            fsync_path(folder)
    except OSError as exc:
        names = ", ".join(str(p) for p in paths)
        raise CnnforgeError(
            f"cannot write {names} ({exc.strerror}); check space and permissions"
        ) from None
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix) that replaces ``path`` on success."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_model_atomic(model: Any, path: Path) -> None:
    """``model.save`` to ``path`` (a ``.keras`` file) through a temporary name."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def replace_folder(staging: Path, target: Path) -> None:
    """Rename the finished folder ``staging`` to ``target``; an old ``target`` is moved aside
    first and removed after, so ``target`` is always either the old folder or the new one."""
    for root, _, files in os.walk(staging):
        for name in files:
            fsync_path(Path(root) / name)
    if not target.exists():
        os.replace(staging, target)
    else:
        old = temporary_sibling(target, "old")
        os.replace(target, old)
        try:
            os.replace(staging, target)
        except OSError:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(target.parent)
