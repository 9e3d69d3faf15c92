"""``cnnforge search`` prints how to look at the trials only for the trackers that logged them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cnnforge.cli import cli


@pytest.mark.slow
def test_a_tracker_that_failed_to_start_gets_no_line(small_npz, tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, so no MLflow store can be made under it")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocked}/mlflow.db")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        [
            "search",
            "--data",
            str(small_npz),
            "--run-dir",
            str(run_dir),
            "--max-trials",
            "1",
            "--epochs",
            "1",
            "--patience",
            "0",
            "--fix",
            "conv_blocks=1",
            "--no-retrain",
            "--track",
            "tensorboard,mlflow",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "tracking with mlflow stopped" in result.output
    assert f"tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}" in result.output
    assert "mlflow:" not in result.output
