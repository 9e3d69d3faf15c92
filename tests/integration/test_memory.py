"""What a backbone run at its native size costs in memory after the search: the export (with its
parity check and accuracy gate), evaluate and report, each run as a user runs them (the CLI, a
process of its own) under a watchdog that kills it above the ceiling docs/reliability.md states.

A 28×28 dataset and MobileNetV2 at 224: the images are resized inside the model, so a batch of
256 through the Keras model once held every layer's activations at 224×224 (about 100 MB an
image) and an export was killed by the kernel at 24 GB.
"""

from __future__ import annotations

import os
import sys

import keras
import pytest
from backbone_run import make_backbone_run
from memory import GB, run_measured

# docs/reliability.md, "Memory": export, parity, accuracy gate, evaluate and report of a
# built-in backbone at its native size on the bundled data stay under this resident size.
CEILING = 3 * GB


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cnnforge.cli", *args]


@pytest.mark.slow
def test_a_backbone_run_at_native_size_exports_evaluates_and_reports_under_the_ceiling(
    tmp_path, small_npz
):
    run_dir = make_backbone_run(tmp_path / "run", "mobilenet_v2", 224, data=str(small_npz))
    keras.backend.clear_session()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for command in (
        cli("export", str(run_dir)),
        cli("evaluate", str(run_dir / "model.onnx"), "--data", str(small_npz)),
        cli("report", str(run_dir)),
    ):
        measured = run_measured(command, kill_above=CEILING, timeout=600, env=env)
        assert not measured.killed, f"{command[3]} passed {CEILING / GB:g} GiB"
        assert measured.returncode == 0, measured.output[-2000:]
        assert measured.peak_rss < CEILING
    assert (run_dir / "model.onnx").is_file() and (run_dir / "report.html").is_file()
