"""The data behind the run report's figures, as plain values: trial scores, the Pareto front,
the winner's training history, test-split predictions and mistakes, and what a run still lacks.

Nothing here draws (``cnnforge.report.plots`` does) and nothing formats text for a page
(``cnnforge.report.html`` does). Predictions come from the exported model, with onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.calibration import selective_accuracy, uncalibrated
from cnnforge.core.objectives import TrialPoint, as_number, best_first, pareto_front, run_order
from cnnforge.core.rundir import RunDir
from cnnforge.data.dataset import Dataset, as_dataset
from cnnforge.deploy.runtime import metadata, open_session
from cnnforge.evaluation.evaluate import (
    class_scores,
    confusion_matrix,
    predict_images,
    source_preprocessing,
)
from cnnforge.tuning.plan import COUNT_DEFAULTS, SearchPlan


def latency_column(trials: list[dict[str, str]]) -> str | None:
    """The first trials.csv column that holds a latency, if the search measured one."""
    return next((c for c in (trials[0] if trials else {}) if c.startswith("latency")), None)


def trial_points(trials: list[dict[str, str]]) -> list[TrialPoint]:
    """One point per trials.csv row, in the order the trials ran."""
    column = latency_column(trials)
    rows = sorted(trials, key=lambda t: run_order(t["trial_id"]))
    return [
        TrialPoint(
            t["trial_id"],
            t["status"],
            as_number(t["score"]),
            as_number(t.get(column or "")),
            as_number(t.get("size_mb")),
        )
        for t in rows
    ]


@dataclass(frozen=True)
class ParetoFronts:
    """The front of the objective against latency (what a plot of the two can show), and the
    trials that join it once ONNX size counts too (the trials table's ``pareto`` column is the
    two together): each is smaller than every trial that beats it."""

    latency: list[TrialPoint]
    smaller: list[TrialPoint]


def pareto_fronts(points: list[TrialPoint], objective: str) -> ParetoFronts:
    """The fronts of ``points`` by latency, and by latency and size (when sizes are recorded)."""
    latency = pareto_front(points, objective)
    on_it = {p.trial_id for p in latency}
    with_size = pareto_front(points, objective, with_size=True)
    return ParetoFronts(latency, [p for p in with_size if p.trial_id not in on_it])


def best_trial(run: dict[str, Any]) -> tuple[str | None, bool]:
    """The winner's trial id, and whether the search finished (else: the best trial so far)."""
    if "search" in run:
        return str(run["search"]["trial_id"]), True
    objective = run["config"]["search"]["objective"]
    ranked = best_first(trial_points(run["trials"]), objective, score=lambda p: p.score)
    if not ranked or ranked[0].score is None:
        return None, False
    return ranked[0].trial_id, False


def training_history(run_dir: Path, trial_id: str) -> dict[str, list[float]]:
    """Per-epoch metrics of a trial (``loss``, ``val_accuracy``, …); empty if not recorded."""
    return RunDir(run_dir).read_cost(trial_id).get("history", {})


@dataclass
class Predictions:
    images: np.ndarray  # (N, H, W, C) raw pixels
    labels: np.ndarray  # (N,) true class
    predicted: np.ndarray  # (N,) predicted class
    confidence: np.ndarray  # (N,) probability of the predicted class
    probabilities: np.ndarray | None = None  # (N, classes), as the exported model gives them
    temperature: float | None = None  # the temperature in the model's graph, where calibrated
    label_smoothing: float = 0.0  # the network's, taken off before that temperature


def predict_test_split(model_path: Path, data: str | Dataset) -> Predictions:
    """The ONNX model's predictions on the test split of ``data`` (onnxruntime, in the model's
    own layout, as ``evaluate`` makes them: :func:`cnnforge.evaluation.evaluate.predict_images`)."""
    session = open_session(model_path)
    dataset = as_dataset(data, preprocessing=source_preprocessing(model_path, session))
    probabilities = predict_images(
        model_path, dataset.x_test, session=session, source=dataset.spec.name
    )
    fitted = metadata(session).get("probability_calibration")
    fitted = fitted if isinstance(fitted, dict) else {}
    return Predictions(
        dataset.x_test,
        dataset.y_test,
        probabilities.argmax(axis=1),
        probabilities.max(axis=1),
        probabilities,
        fitted.get("temperature"),
        fitted.get("label_smoothing", 0.0),
    )


def calibration_views(
    probabilities: np.ndarray, temperature: float | None, label_smoothing: float = 0.0
) -> dict[str, Any]:
    """The test probabilities to compare, by name: for a calibrated model, before (its
    calibration undone: ``calibration.uncalibrated``) and after."""
    if not temperature:
        return {"exported model (not calibrated)": probabilities}
    return {
        "before calibration": uncalibrated(probabilities, temperature, label_smoothing),
        f"after calibration (T = {temperature:.2f})": probabilities,
    }


def coverage_curve(
    probabilities: np.ndarray, labels: np.ndarray, steps: int = 20
) -> list[tuple[float, float]]:
    """(coverage, accuracy on the most confident share) at ``steps`` even coverages up to 1."""
    coverages = [(i + 1) / steps for i in range(steps)]
    return [(c, selective_accuracy(probabilities, labels, c)) for c in coverages]


def misclassified(predictions: Predictions, count: int = 12) -> list[int]:
    """Indices of the wrong predictions, the most confident mistakes first (ties: index)."""
    wrong = np.flatnonzero(predictions.predicted != predictions.labels)
    order = np.argsort(-predictions.confidence[wrong], kind="stable")
    return [int(i) for i in wrong[order][:count]]


def class_table(predictions: Predictions, class_names: tuple[str, ...]) -> dict[str, Any]:
    """Confusion matrix and per-class scores in evaluation.json's layout, from predictions."""
    matrix = confusion_matrix(predictions.labels, predictions.predicted, len(class_names))
    return {
        "confusion": matrix.tolist(),
        "per_class": [vars(score) for score in class_scores(matrix, class_names)],
    }


@dataclass(frozen=True)
class Missing:
    file: str
    consequence: str
    remedy: str


def missing_artifacts(run_dir: Path, run: dict[str, Any]) -> list[Missing]:
    """What a run directory lacks for a full report, what that leaves out, how to make it."""
    rundir = RunDir(run_dir)
    config = run["config"]["search"]
    trials = len(run["trials"])
    plan = run.get("plan")
    asked = (
        SearchPlan.from_json(plan).trials
        if plan
        else config["max_trials"] or COUNT_DEFAULTS["max_trials"]
    )
    onnx = rundir.onnx
    wanted = [
        (
            rundir.search,
            f"the search has not finished ({trials} of {asked} trials recorded)",
            f"run the same `cnnforge search` command with `--run-dir {run_dir}` again to resume it",
        ),
        (
            rundir.best_model,
            "no best model yet: no feature maps, nothing to export",
            "finish the search (above)",
        ),
        (
            onnx,
            "no exported model: no parity, latency or test-split results",
            f"`cnnforge export {run_dir}`",
        ),
        (
            rundir.bench,
            "no latency measurements",
            f"`cnnforge bench {onnx} --keras {rundir.best_model} --json {rundir.bench}`",
        ),
        (
            rundir.evaluation,
            "no test-split accuracy, confusion matrix or per-class scores",
            f"`cnnforge evaluate {onnx} --data {config['data']} --json {rundir.evaluation}`",
        ),
    ]
    return [Missing(path.name, *rest) for path, *rest in wanted if not path.is_file()]
