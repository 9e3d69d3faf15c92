"""A trial re-run after an interruption (KerasTuner runs it again from its first epoch) logs
each epoch once, in a real TensorBoard event folder and a real MLflow SQLite store."""

from __future__ import annotations

import pytest

from cnnforge.tracking import open_tracking

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

SPACE = ["units"]


def _interrupted_then_resumed(run_dir) -> None:
    first = open_tracking(run_dir, ["tensorboard", "mlflow"], model_name="m")
    first.search_started({"arch": "m"}, SPACE)
    first.trial_started("0", {"units": 8})
    for epoch in (0, 1):
        first.epoch_ended("0", epoch, {"loss": 2.0 - epoch})
    first.close()  # interrupted mid-trial: its runs are KILLED, its folder kept
    resumed = open_tracking(run_dir, ["tensorboard", "mlflow"], model_name="m")
    assert resumed.names == ["tensorboard", "mlflow"]
    resumed.search_started({"arch": "m"}, SPACE)
    resumed.trial_started("0", {"units": 8})
    for epoch in (0, 1, 2):
        resumed.epoch_ended("0", epoch, {"loss": 1.5 - epoch / 2})
    resumed.trial_ended({"trial_id": "0", "status": "COMPLETED", "score": 0.5, "epochs": 3})
    resumed.search_ended(None)
    resumed.close()


def test_a_resumed_trial_logs_each_epoch_once(tmp_path):
    import json

    import tensorflow as tf

    _interrupted_then_resumed(tmp_path)
    steps = [
        event.step
        for path in sorted((tmp_path / "tensorboard" / "trial_0").glob("events.out.tfevents.*"))
        for event in tf.compat.v1.train.summary_iterator(str(path))
        if any(v.tag == "epoch/loss" for v in event.summary.value)
    ]
    assert sorted(steps) == [0, 1, 2]

    ids = json.loads((tmp_path / "mlflow.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(ids["trials"]["0"], "loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert client.get_run(ids["trials"]["0"]).info.status == "FINISHED"
