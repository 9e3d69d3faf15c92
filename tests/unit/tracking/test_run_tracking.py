"""``cnnforge run --track tensorboard,mlflow`` end to end: the CLI prints how to look at the
trials, and the MLflow store holds the winner's files and its registered ONNX model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cnnforge.cli import cli

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

WINNER_FILES = {"model.onnx", "parity.json", "bench.json", "report.html"}


@pytest.mark.slow
def test_run_logs_the_winner_and_registers_its_onnx_model(small_npz, tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", "--data", str(small_npz), "--run-dir", str(run_dir), "--max-trials", "1"]
    args += ["--epochs", "1", "--patience", "0", "--fix", "conv_blocks=1"]
    result = CliRunner().invoke(cli, [*args, "--track", "tensorboard,mlflow"])
    assert result.exit_code == 0, result.output
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in result.output
    store = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    assert f"mlflow ui --backend-store-uri {store}" in result.output

    client = MlflowClient(store)
    parent = json.loads((run_dir / "mlflow.json").read_text())["parent"]
    assert {a.path for a in client.list_artifacts(parent)} >= WINNER_FILES
    (version,) = client.search_model_versions("name = 'cnnforge-simple_cnn'")
    assert version.run_id == parent and version.source.endswith("/model.onnx")
    assert client.get_run(parent).data.tags["cnnforge.registered_model"] == (
        f"cnnforge-simple_cnn/{version.version}"
    )
    logged = client.download_artifacts(parent, "model.onnx", str(tmp_path))
    assert Path(logged).read_bytes() == (run_dir / "model.onnx").read_bytes()
