"""Tracking for real: a small real search logged to TensorBoard (its event files read back with
TensorBoard's own reader, HParams included) and to MLflow (a real SQLite store queried through
MlflowClient); a resumed search continues the same MLflow runs; a broken tracker is one warning
and the search finishes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.tracking import parse_track
from cnnforge.tuning.search import SearchConfig, search

mlflow = pytest.importorskip("mlflow")  # the mlflow extra, part of the test extra
from mlflow.tracking import MlflowClient  # noqa: E402

SMALL = dict(epochs=2, patience=0, retrain=False, fix={"conv_blocks": "1"})
EPOCH_SCALARS = {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_s"}


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    accumulator.Reload()
    return accumulator


def scalar(accumulator, tag: str) -> list[tuple[int, float]]:
    """A tf.summary.scalar's (step, value) pairs (TF2 writes scalars as tensors)."""
    import tensorflow as tf

    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors(tag)]


def hparams_data(accumulator, tag: str):
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = accumulator.PluginTagToContent("hparams")[tag]
    return plugin_data_pb2.HParamsPluginData.FromString(content)


@pytest.fixture(scope="module")
def tracked_run(small_npz, tmp_path_factory):
    """One trial, then the search resumed for a second: logged to TensorBoard and MLflow."""
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    config = SearchConfig(
        data=str(small_npz), run_dir=run_dir, max_trials=1, track=["tensorboard", "mlflow"], **SMALL
    )
    first_ids = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CnnforgeWarning)  # no tracker may fail here
        search(config)
        first_ids = json.loads((run_dir / "mlflow.json").read_text())
        resumed = SearchConfig(data=str(small_npz), run_dir=run_dir, max_trials=2, **SMALL)
        result = search(resumed)  # track not given: the run directory's is kept
    return result, first_ids, resumed


@pytest.mark.slow
def test_tensorboard_has_every_epoch_of_every_trial(tracked_run):
    result, _, _ = tracked_run
    logdir = result.run_dir / "tensorboard"
    for record in result.trials:
        trial = events(logdir / f"trial_{record.trial_id}")
        tags = set(trial.Tags()["tensors"])
        assert {f"epoch/{name}" for name in EPOCH_SCALARS} <= tags, tags
        losses = scalar(trial, "epoch/loss")
        assert [step for step, _ in losses] == [0, 1]
        assert all(value > 0 for _, value in losses)
        assert all(value > 0 for _, value in scalar(trial, "epoch/images_per_s"))
        assert scalar(trial, "epoch/learning_rate")[0][1] == pytest.approx(
            record.hyperparameters["learning_rate"], rel=0.5
        )
        ((_, objective),) = scalar(trial, "trial/objective")
        assert objective == pytest.approx(record.score)
        ((_, params),) = scalar(trial, "trial/params")
        assert params == record.params


@pytest.mark.slow
def test_tensorboard_hparams_dashboard_has_each_trial(tracked_run):
    result, _, _ = tracked_run
    logdir = result.run_dir / "tensorboard"
    experiment = hparams_data(events(logdir), "_hparams_/experiment").experiment
    assert {"filters_0", "learning_rate", "conv_blocks"} <= {
        h.name for h in experiment.hparam_infos
    }
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"trial/objective", "trial/latency_ms", "trial/params"} <= metric_tags
    for record in result.trials:
        trial = events(logdir / f"trial_{record.trial_id}")
        session = hparams_data(trial, "_hparams_/session_start_info").session_start_info
        assert session.group_name == f"trial_{record.trial_id}"
        assert session.hparams["filters_0"].number_value == record.hyperparameters["filters_0"]


@pytest.mark.slow
def test_mlflow_has_the_search_and_a_child_run_per_trial(tracked_run):
    result, _, _ = tracked_run
    client = MlflowClient(f"sqlite:///{result.run_dir / 'mlflow.db'}")
    ids = json.loads((result.run_dir / "mlflow.json").read_text())
    parent = client.get_run(ids["parent"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "run"
    assert parent.data.params["objective"] == "val_accuracy"
    assert parent.data.tags["cnnforge.best_trial"] == result.best_trial.trial_id
    assert parent.data.metrics["best_score"] == pytest.approx(result.best_trial.score)
    children = client.search_runs(
        [ids["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["trial_0", "trial_1"]
    by_name = {r.info.run_name: r for r in children}
    for record in result.trials:
        child = by_name[f"trial_{record.trial_id}"]
        assert child.info.status == "FINISHED"
        assert child.data.tags["cnnforge.status"] == "COMPLETED"
        assert child.data.params["filters_0"] == str(record.hyperparameters["filters_0"])
        assert child.data.metrics["score"] == pytest.approx(record.score)
        assert child.data.metrics["params"] == record.params
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [0, 1]
        assert client.get_metric_history(child.info.run_id, "images_per_s")[0].value > 0
    # the artifacts of the default store stay in the run directory
    assert parent.info.artifact_uri.startswith((result.run_dir / "mlartifacts").as_uri())


@pytest.mark.slow
def test_a_resumed_search_continues_the_same_mlflow_runs(tracked_run):
    result, first_ids, resumed = tracked_run
    ids = json.loads((result.run_dir / "mlflow.json").read_text())
    assert ids["parent"] == first_ids["parent"]
    assert ids["trials"]["0"] == first_ids["trials"]["0"] and set(ids["trials"]) == {"0", "1"}
    client = MlflowClient(f"sqlite:///{result.run_dir / 'mlflow.db'}")
    runs = client.search_runs([ids["experiment_id"]])
    assert len(runs) == 3  # one search, two trials: no second parent
    assert resumed.track == ["tensorboard", "mlflow"]
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["search"]["track"] == ["tensorboard", "mlflow"]


@pytest.mark.slow
def test_a_broken_tracker_is_one_warning_and_the_search_finishes(small_npz, tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, so no store can be made under it")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocked}/mlflow.db")
    config = SearchConfig(
        data=str(small_npz), run_dir=tmp_path / "run", max_trials=1, track=["mlflow"], **SMALL
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = search(config)
    ours = [w for w in caught if issubclass(w.category, CnnforgeWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "tracking with mlflow stopped" in str(ours[0].message)
    assert "\n" not in str(ours[0].message)
    assert [t.status for t in result.trials] == ["COMPLETED"]
    assert result.best_model.is_file()
    assert not (result.run_dir / "tensorboard").exists()  # only the trackers asked for


def test_track_names_tensorboard_by_default_and_none_turns_tracking_off():
    assert parse_track(None) == ("tensorboard",)
    assert parse_track(["tensorboard,mlflow", "mlflow"]) == ("tensorboard", "mlflow")
    assert parse_track(["none"]) == ()
    with pytest.raises(CnnforgeError, match="--track takes tensorboard, mlflow or none"):
        parse_track(["wandb"])
    with pytest.raises(CnnforgeError, match="give it alone"):
        parse_track(["none", "mlflow"])


def test_a_search_logs_to_tensorboard_by_default(finished_run):
    run_dir = finished_run.run_dir
    assert json.loads((run_dir / "config.json").read_text())["search"]["track"] == ["tensorboard"]
    trial = events(run_dir / "tensorboard" / "trial_0")
    assert len(scalar(trial, "epoch/val_accuracy")) == 2
    assert not (run_dir / "mlflow.db").exists()
