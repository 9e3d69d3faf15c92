"""The data behind the report's figures, on small known tables and on a real finished run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnnforge.core.objectives import TrialPoint, pareto_front
from cnnforge.report.figures import (
    Predictions,
    best_trial,
    calibration_views,
    class_table,
    coverage_curve,
    latency_column,
    misclassified,
    missing_artifacts,
    pareto_fronts,
    predict_test_split,
    training_history,
    trial_points,
)


def _predictions(labels, predicted, confidence) -> Predictions:
    n = len(labels)
    return Predictions(
        np.zeros((n, 2, 2, 1)),
        np.array(labels),
        np.array(predicted),
        np.array(confidence, dtype=float),
    )


KNOWN = _predictions(
    labels=[0, 0, 0, 1, 1, 2],
    predicted=[0, 0, 1, 1, 2, 2],
    confidence=[0.9, 0.8, 0.7, 0.6, 0.95, 0.5],
)


def test_confusion_and_class_scores_of_a_known_prediction_table():
    table = class_table(KNOWN, ("cat", "dog", "eel"))
    assert table["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    scores = {c["name"]: c for c in table["per_class"]}
    assert scores["cat"]["precision"] == 1.0 and scores["cat"]["recall"] == pytest.approx(2 / 3)
    assert scores["dog"]["precision"] == 0.5 and scores["dog"]["recall"] == 0.5
    assert scores["eel"]["precision"] == 0.5 and scores["eel"]["recall"] == 1.0
    assert [c["support"] for c in table["per_class"]] == [3, 2, 1]


def test_misclassified_most_confident_mistakes_first():
    assert misclassified(KNOWN) == [4, 2]  # 0.95 (dog→eel) before 0.7 (cat→dog)
    assert misclassified(KNOWN, count=1) == [4]
    assert misclassified(_predictions([0, 1], [0, 1], [0.9, 0.9])) == []


def test_coverage_curve_by_hand():
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.55, 0.45]])
    labels = np.array([0, 0, 1, 1])  # by confidence: 0.9 right, 0.8 right, 0.6 wrong, 0.55 wrong
    assert coverage_curve(probabilities, labels, steps=4) == [
        (0.25, 1.0),
        (0.5, 1.0),
        (0.75, pytest.approx(2 / 3)),
        (1.0, 0.5),
    ]


def test_calibration_views_undo_the_recorded_temperature():
    from cnnforge.core.calibration import rescale

    raw = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    calibrated = rescale(raw, 2.0)
    views = calibration_views(calibrated, 2.0)
    assert list(views) == ["before calibration", "after calibration (T = 2.00)"]
    np.testing.assert_allclose(views["before calibration"], raw, atol=1e-9)
    assert list(calibration_views(raw, None)) == ["exported model (not calibrated)"]
    # a label-smoothed network's: the temperature undone, then its smoothing put back
    smoothed = 0.85 * np.array([[0.8, 0.15, 0.05], [0.1, 0.3, 0.6]]) + 0.05
    views = calibration_views(rescale(smoothed, 1.5, 0.15), 1.5, 0.15)
    np.testing.assert_allclose(views["before calibration"], smoothed, atol=1e-9)


def _trials(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"trial_id": r[0], "status": r[1], "score": r[2], **r[3]} for r in rows]


def test_trial_points_in_run_order_with_failures_and_latency():
    trials = _trials(
        [
            ("10", "COMPLETED", "0.9", {"latency_ms": "2.0"}),
            ("2", "FAILED", "", {"latency_ms": ""}),
            ("1", "COMPLETED", "0.8", {"latency_ms": "1.0"}),
        ]
    )
    assert latency_column(trials) == "latency_ms"
    assert trial_points(trials) == [
        TrialPoint("1", "COMPLETED", 0.8, 1.0),
        TrialPoint("2", "FAILED", None, None),
        TrialPoint("10", "COMPLETED", 0.9, 2.0),
    ]
    assert trial_points(_trials([("0", "COMPLETED", "0.5", {"size_mb": "1.5"})]))[0].size == 1.5
    without = _trials([("0", "COMPLETED", "0.5", {"params": "10"})])
    assert latency_column(without) is None and trial_points(without)[0].latency is None


def test_pareto_front_for_a_maximised_and_a_minimised_objective():
    points = [
        TrialPoint("a", "COMPLETED", 0.80, 1.0),
        TrialPoint("b", "COMPLETED", 0.85, 3.0),
        TrialPoint("c", "COMPLETED", 0.70, 2.0),  # slower and worse than a: dominated
        TrialPoint("d", "COMPLETED", 0.90, 5.0),
        TrialPoint("e", "COMPLETED", 0.85, 4.0),  # as good as b, but slower
        TrialPoint("f", "FAILED", None, 0.5),
    ]
    assert [p.trial_id for p in pareto_front(points, "val_accuracy")] == ["a", "b", "d"]
    # As a loss, lower is better: a (0.80 at 1 ms) and c (0.70 at 2 ms).
    assert [p.trial_id for p in pareto_front(points, "val_loss")] == ["a", "c"]


# b is slower and worse than a, but smaller: on the front once size counts, not on the plot's.
SIZE_CHANGES_THE_FRONT = [
    ("0", "COMPLETED", "0.90", {"latency_ms": "1.0", "size_mb": "2.0"}),
    ("1", "COMPLETED", "0.80", {"latency_ms": "2.0", "size_mb": "0.5"}),
    ("2", "COMPLETED", "0.70", {"latency_ms": "3.0", "size_mb": "2.0"}),
]


def test_the_plot_and_the_trials_table_show_the_same_front():
    from cnnforge.tuning.records import TrialRecord, mark_pareto_front

    trials = _trials(SIZE_CHANGES_THE_FRONT)
    records = [
        TrialRecord(
            t["trial_id"],
            t["status"],
            float(t["score"]),
            {},
            {},
            latency_ms=float(t["latency_ms"]),
            size_mb=float(t["size_mb"]),
        )
        for t in trials
    ]
    mark_pareto_front(records, "val_accuracy")  # the trials table's pareto column
    table_front = {r.trial_id for r in records if r.pareto}
    assert table_front == {"0", "1"}
    fronts = pareto_fronts(trial_points(trials), "val_accuracy")
    assert [p.trial_id for p in fronts.latency] == ["0"]  # the plot's line: score and latency
    assert [p.trial_id for p in fronts.smaller] == ["1"]  # marked apart: on it for its size
    assert {p.trial_id for p in fronts.latency + fronts.smaller} == table_front
    without_size = _trials(
        [(i, s, v, {"latency_ms": m["latency_ms"]}) for i, s, v, m in SIZE_CHANGES_THE_FRONT]
    )
    assert pareto_fronts(trial_points(without_size), "val_accuracy").smaller == []


def test_best_trial_is_the_winner_or_the_best_so_far():
    config = {"search": {"objective": "val_accuracy"}}
    trials = _trials([("0", "COMPLETED", "0.6", {}), ("1", "COMPLETED", "0.7", {})])
    assert best_trial({"config": config, "trials": trials, "search": {"trial_id": "0"}}) == (
        "0",
        True,
    )
    assert best_trial({"config": config, "trials": trials}) == ("1", False)
    assert best_trial({"config": config, "trials": []}) == (None, False)


def test_a_run_without_a_finished_search_says_what_is_missing(tmp_path):
    (tmp_path / "trials.csv").write_text("trial_id,status,score\n0,COMPLETED,0.5\n")
    run = {
        "config": {"search": {"max_trials": 5, "data": "fashion_mnist_small"}},
        "trials": [{"trial_id": "0"}],
    }
    missing = {m.file: m for m in missing_artifacts(tmp_path, run)}
    assert list(missing) == [
        "search.json",
        "best.keras",
        "model.onnx",
        "bench.json",
        "evaluation.json",
    ]
    assert "1 of 5 trials recorded" in missing["search.json"].consequence
    assert f"cnnforge export {tmp_path}" in missing["model.onnx"].remedy
    assert "--data fashion_mnist_small" in missing["evaluation.json"].remedy


def test_the_winner_history_and_predictions_of_a_real_run(finished_run, small_npz):
    run_dir = finished_run.run_dir
    history = training_history(run_dir, finished_run.best_trial.trial_id)
    assert set(history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(history["val_accuracy"]) == finished_run.best_trial.epochs
    assert max(history["val_accuracy"]) == pytest.approx(finished_run.best_trial.score)
    assert training_history(run_dir, "999") == {}

    predictions = predict_test_split(run_dir / "model.onnx", str(small_npz))
    assert predictions.images.shape == (200, 28, 28, 1)
    assert ((predictions.confidence > 0) & (predictions.confidence <= 1)).all()
    saved = json.loads((run_dir / "search.json").read_text())
    assert saved["trial_id"] == finished_run.best_trial.trial_id


def test_test_split_figures_of_an_nchw_model_match_the_nhwc_ones(
    finished_run, variants, small_npz, tmp_path
):
    """``cnnforge export RUN --layout nchw`` as the run's model.onnx: the same predictions, and
    report.html keeps its test-split figures. (The NCHW export of the run's own best.keras is
    the session's ``variants`` fixture.)"""
    import re
    import shutil

    from cnnforge.deploy.onnxinfo import image_input
    from cnnforge.report.html import write_html_report

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run_dir)
    (run_dir / "evaluation.json").unlink(missing_ok=True)  # the figures come from model.onnx
    shutil.copy(variants["nchw"].onnx_path, run_dir / "model.onnx")
    assert image_input(run_dir / "model.onnx").layout == "NCHW"

    nhwc = predict_test_split(finished_run.run_dir / "model.onnx", str(small_npz))
    nchw = predict_test_split(run_dir / "model.onnx", str(small_npz))
    np.testing.assert_array_equal(nchw.images, nhwc.images)
    np.testing.assert_array_equal(nchw.predicted, nhwc.predicted)
    np.testing.assert_allclose(nchw.confidence, nhwc.confidence, atol=1e-5)

    page = write_html_report(run_dir).read_text()
    figures = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]*)"', page)
    assert "Test images unavailable" not in page
    for figure in ("confusion matrix on the test split", "misclassified test images"):
        assert figure in figures


def test_test_split_of_a_model_without_recorded_preprocessing_is_read_as_evaluate_reads_it(
    tmp_path,
):
    """A model exported by another tool, on photos of another size: the report's test-split
    figures stretch them to its input, as ``evaluate`` (and ``predict``) do."""
    import tiny_onnx
    from PIL import Image

    from cnnforge.evaluation.evaluate import evaluate

    rng = np.random.default_rng(5)
    for split in ("train", "test"):
        for c in range(4):
            (tmp_path / "photos" / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "photos" / split / f"c{c}" / f"{i}.png")
    model = tiny_onnx.save(tiny_onnx.conv_classifier(), tmp_path / "bare.onnx")
    source = str(tmp_path / "photos")
    predictions = predict_test_split(model, source)
    assert predictions.images.shape == (12, 16, 16, 3)
    names = ("c0", "c1", "c2", "c3")
    assert class_table(predictions, names)["confusion"] == evaluate(model, source).confusion
