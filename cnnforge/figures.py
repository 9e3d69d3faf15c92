"""The data behind the run report's figures, as plain values: trial scores, the Pareto front,
the winner's training history, test-split predictions and mistakes, and what a run still lacks.

Nothing here draws (``cnnforge.plots`` does) and nothing formats text for a page
(``cnnforge.report_html`` does). Predictions come from the exported model, with onnxruntime.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.errors import CnnforgeError
from cnnforge.evaluate import class_scores, confusion_matrix
from cnnforge.objectives import higher_is_better


@dataclass(frozen=True)
class TrialPoint:
    trial_id: str
    status: str
    score: float | None  # the search objective; None for a failed or running trial
    latency: float | None = None
    size: float | None = None  # ONNX size in MB


def latency_column(trials: list[dict[str, str]]) -> str | None:
    """The first trials.csv column that holds a latency, if the search measured one."""
    return next((c for c in (trials[0] if trials else {}) if c.startswith("latency")), None)


def as_number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _run_order(trial_id: str) -> tuple[int, str]:
    return (int(trial_id), trial_id) if trial_id.isdigit() else (math.inf, trial_id)


def trial_points(trials: list[dict[str, str]]) -> list[TrialPoint]:
    """One point per trials.csv row, in the order the trials ran."""
    column = latency_column(trials)
    rows = sorted(trials, key=lambda t: _run_order(t["trial_id"]))
    return [
        TrialPoint(
            t["trial_id"], t["status"], as_number(t["score"]), as_number(t.get(column or ""))
        )
        for t in rows
    ]


def pareto_front(
    points: list[TrialPoint], objective: str, *, with_size: bool = False
) -> list[TrialPoint]:
    """The trials no other trial dominates, by latency: another dominates a trial when it is at
    least as good on the objective, latency (lower) and, ``with_size``, size (lower), and
    strictly better on one. Of trials equal on all of them, the first is kept."""
    sign = 1 if higher_is_better(objective) else -1

    def costs(p: TrialPoint) -> tuple[float, ...]:
        return (-sign * p.score, p.latency, *((p.size,) if with_size else ()))  # type: ignore

    measured = [
        p
        for p in points
        if p.score is not None and p.latency is not None and (p.size is not None or not with_size)
    ]
    front: list[TrialPoint] = []
    for point in sorted(measured, key=lambda p: (p.latency, -sign * p.score)):
        mine = costs(point)
        if not any(
            all(o <= m for o, m in zip(costs(other), mine, strict=True)) for other in front
        ) and not any(_dominates(costs(other), mine) for other in measured):
            front.append(point)
    return front


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def sorted_trials(
    trials: list[dict[str, str]], objective: str, column: str | None = None
) -> list[dict[str, str]]:
    """trials.csv rows sorted by ``column`` (default: the objective's score, best first;
    a latency, size or count: smallest first); rows without a value go last."""
    if trials and column is not None and column not in trials[0]:
        raise CnnforgeError(
            f"trials.csv has no column {column!r}; choose from {', '.join(trials[0])}"
        )
    column = column or "score"
    if column == "score":
        descending = higher_is_better(objective)
    elif "accuracy" in column or "loss" in column:  # a metric
        descending = higher_is_better(column)
    else:  # a cost (latency, size, params...), or pareto (front first)
        descending = column == "pareto"

    def key(row: dict[str, str]) -> tuple:
        if column == "trial_id":
            return (0, *_run_order(row["trial_id"]))
        value = as_number(row.get(column))
        if value is None:
            return (1, 0.0, row.get(column) or "")
        return (0, -value if descending else value, "")

    return sorted(trials, key=key)


def best_trial(run: dict[str, Any]) -> tuple[str | None, bool]:
    """The winner's trial id, and whether the search finished (else: the best trial so far)."""
    if "search" in run:
        return str(run["search"]["trial_id"]), True
    objective = run["config"]["search"]["objective"]
    scored = [p for p in trial_points(run["trials"]) if p.score is not None]
    if not scored:
        return None, False
    pick = max if higher_is_better(objective) else min
    return pick(scored, key=lambda p: p.score).trial_id, False


def training_history(run_dir: Path, trial_id: str) -> dict[str, list[float]]:
    """Per-epoch metrics of a trial (``loss``, ``val_accuracy``, …); empty if not recorded."""
    cost = Path(run_dir) / "tuner" / f"trial_{trial_id}" / "cnnforge_cost.json"
    if not cost.is_file():
        return {}
    return json.loads(cost.read_text()).get("history", {})


@dataclass
class Predictions:
    images: np.ndarray  # (N, H, W, C) raw pixels
    labels: np.ndarray  # (N,) true class
    predicted: np.ndarray  # (N,) predicted class
    confidence: np.ndarray  # (N,) probability of the predicted class


def predict_test_split(model_path: Path, data: str) -> Predictions:
    """The ONNX model's predictions on the test split of ``data`` (onnxruntime)."""
    from cnnforge.data import load_dataset
    from cnnforge.runtime import open_session, predict

    dataset = load_dataset(data)
    probabilities = predict(open_session(model_path), dataset.x_test)
    return Predictions(
        dataset.x_test,
        dataset.y_test,
        probabilities.argmax(axis=1),
        probabilities.max(axis=1),
    )


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
    run_dir = Path(run_dir)
    config = run["config"]["search"]
    trials, asked = len(run["trials"]), config["max_trials"]
    onnx = run_dir / "model.onnx"
    wanted = [
        ("search.json", f"the search has not finished ({trials} of {asked} trials recorded)",
         f"run the same `cnnforge search` command with `--run-dir {run_dir}` again to resume it"),
        ("best.keras", "no best model yet: no feature maps, nothing to export",
         "finish the search (above)"),
        ("model.onnx", "no exported model: no parity, latency or test-split results",
         f"`cnnforge export {run_dir}`"),
        ("bench.json", "no latency measurements",
         f"`cnnforge bench {onnx} --keras {run_dir / 'best.keras'} --json {run_dir / 'bench.json'}`"),
        ("evaluation.json", "no test-split accuracy, confusion matrix or per-class scores",
         f"`cnnforge evaluate {onnx} --data {config['data']} --json {run_dir / 'evaluation.json'}`"),
    ]  # fmt: skip
    return [Missing(*item) for item in wanted if not (run_dir / item[0]).is_file()]
