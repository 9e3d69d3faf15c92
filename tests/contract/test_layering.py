"""The layering of the stages, checked by import-linter (the contracts in pyproject.toml) the way
CI runs it, and shown to catch what it is there for: an import circle, a backwards import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lint_imports(
    *args: str, cwd: Path = ROOT, path: Path | None = None
) -> subprocess.CompletedProcess:
    executable = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    env = {"PYTHONPATH": str(path)} if path else {}
    return subprocess.run(
        [executable, "--no-cache", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )


def test_the_stage_contracts_hold():
    result = lint_imports()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


CONFIG = """\
[importlinter]
root_package = forge

[importlinter:contract:layers]
name = layers
type = layers
layers =
    forge.tuning
    forge.core

[importlinter:contract:cycles]
name = cycles
type = acyclic_siblings
ancestors =
    forge.tuning
"""


@pytest.mark.parametrize(
    ("files", "broken"),
    [
        # core reaches up into tuning, lazily, inside a function
        (
            {
                "forge/core/errors.py": "def f():\n    from forge.tuning import search\n",
                "forge/tuning/search.py": "from forge.core import errors\n",
            },
            "layers BROKEN",
        ),
        # two modules of one stage import each other
        (
            {
                "forge/tuning/search.py": "from forge.tuning import tuners\n",
                "forge/tuning/tuners.py": "def f():\n    from forge.tuning import search\n",
            },
            "cycles BROKEN",
        ),
    ],
)
def test_a_backwards_import_or_a_circle_fails(tmp_path, files, broken):
    _package(
        tmp_path,
        {"forge/__init__.py": "", "forge/core/__init__.py": "", "forge/tuning/__init__.py": ""}
        | files,
    )
    (tmp_path / ".importlinter").write_text(CONFIG)
    result = lint_imports(cwd=tmp_path, path=tmp_path)
    assert result.returncode != 0
    assert broken in result.stdout
