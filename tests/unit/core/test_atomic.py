"""Atomic writes: durable (file and folder fsynced) and collision-free across containers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cnnforge.core import atomic
from cnnforge.core.atomic import atomic_path, atomic_paths, atomic_write_bytes


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kind of each fd passed to os.fsync ("file" or "dir"), in order."""
    calls: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_a_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = _record_fsyncs(monkeypatch)
    renamed: list[int] = []
    real_replace = os.replace

    def replace(src, dst) -> None:
        renamed.append(len(calls))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(tmp_path / "oracle.json", b"{}")
    assert (tmp_path / "oracle.json").read_bytes() == b"{}"
    assert calls == ["file", "dir"] and renamed == [1]


def test_a_file_written_by_a_library_is_fsynced_too(tmp_path, monkeypatch):
    calls = _record_fsyncs(monkeypatch)
    with atomic_path(tmp_path / "best.keras") as tmp:
        tmp.write_bytes(b"model")  # as model.save(tmp) would: by name, not through our fd
    assert calls == ["file", "dir"]


def test_two_writers_with_the_same_pid_do_not_collide(tmp_path, monkeypatch):
    """PID 1 in every container sharing a run directory: the temporary names must still differ."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    target = tmp_path / "best.keras"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the last rename wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["best.keras"]


def test_written_files_keep_the_usual_permissions(tmp_path):
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask


def test_several_files_are_replaced_only_when_all_were_written(tmp_path):
    model, evidence = tmp_path / "model.onnx", tmp_path / "parity.json"
    model.write_bytes(b"old model")
    evidence.write_bytes(b"old evidence")
    with pytest.raises(RuntimeError), atomic_paths(model, evidence) as (new_model, new_evidence):
        new_model.write_bytes(b"new model")
        raise RuntimeError("parity failed")
    assert (model.read_bytes(), evidence.read_bytes()) == (b"old model", b"old evidence")
    with atomic_paths(model, evidence) as (new_model, new_evidence):
        new_model.write_bytes(b"new model")
        new_evidence.write_bytes(b"new evidence")
    assert (model.read_bytes(), evidence.read_bytes()) == (b"new model", b"new evidence")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "parity.json"]


def test_helper_is_the_only_place_that_renames_run_artifacts():
    root = Path(atomic.__file__).resolve().parents[1]
    renaming = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "os.replace(" in path.read_text() or ".rename(" in path.read_text()
    ]
    assert renaming == [str(Path("core") / "atomic.py")]
