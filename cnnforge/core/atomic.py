"""Write artifacts under a temporary name, then rename: a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cnnforge.core.errors import CnnforgeError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix) that replaces ``path`` on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CnnforgeError(
            f"cannot create folder {path.parent} ({exc.strerror}); choose another"
        ) from None
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise CnnforgeError(
            f"cannot write {path} ({exc.strerror}); check space and permissions"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_model_atomic(model: Any, path: Path) -> None:
    """``model.save`` to ``path`` (a ``.keras`` file) through a temporary name."""
    with atomic_path(path) as tmp:
        model.save(tmp)
