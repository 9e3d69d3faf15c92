"""TensorFlow's C++ log lines (its oneDNN notice, grappler's "Starting new session" per
converted model) stay off a plain command's terminal and come back with --debug."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Lines TensorFlow 2.21 writes from C++ to stderr: at import, and per model tf2onnx converts.
TENSORFLOW_LINES = (
    "oneDNN custom operations",
    "absl::InitializeLog",
    "cpu_feature_guard",
    "Number of eligible GPUs",
    "Starting new session",
)


def cnnforge(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, with none of the test process's TensorFlow log settings."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CNNFORGE_DEBUG")
    }
    return subprocess.run(
        [sys.executable, "-m", "cnnforge.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def tensorflow_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if any(text in line for text in TENSORFLOW_LINES)
    ]


@pytest.mark.slow
def test_a_search_prints_none_of_tensorflows_log_lines(small_npz: Path, tmp_path: Path):
    done = cnnforge(
        "search",
        "--data",
        str(small_npz),
        "--run-dir",
        str(tmp_path / "run"),
        "--tuner",
        "random",
        "--max-trials",
        "1",
        "--epochs",
        "1",
        "--track",
        "none",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "best model:" in done.stdout
    assert tensorflow_lines(done) == []


@pytest.mark.slow
def test_debug_keeps_tensorflows_log_lines():
    done = cnnforge("--debug", "plugins", "show", "simple_cnn")
    assert done.returncode == 0, done.stderr[-2000:]
    assert any("oneDNN custom operations" in line for line in tensorflow_lines(done))
