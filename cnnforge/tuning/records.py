"""What a search records per trial: ``TrialRecord`` (one row of trials.csv), read from
KerasTuner's trial state plus the cost file cnnforge leaves beside it, and what a front end
hears while the search runs (``SearchProgress``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cnnforge.core.objectives import TrialPoint, pareto_front
from cnnforge.core.rundir import RunDir

OVER_BUDGET = "OVER_BUDGET"


@dataclass
class TrialRecord:
    """One row of trials.csv."""

    trial_id: str
    status: str
    score: float | None
    metrics: dict[str, float]
    hyperparameters: dict[str, Any]
    params: int | None = None
    epochs: int | None = None
    best_epoch: int | None = None  # epochs from scratch to the best objective value
    duration_s: float | None = None
    message: str = ""
    latency_ms: float | None = None
    flops: int | None = None
    size_mb: float | None = None
    measure_s: float | None = None
    train_gflops: float | None = None  # the trainer's pace: 3 x forward FLOPs over steady steps
    cores_busy: float | None = None  # CPU seconds over wall seconds of the steady steps
    batch_size: int | None = None  # what it trained at; None: its own fit() chose
    training: str = ""  # whose training recipe: cnnforge's, or the model's own
    pareto: bool = False  # on the front of (objective, latency, size) among completed trials


class SearchProgress(Protocol):
    """What a front end hears while a search runs. It may also have ``search_planned(summary,
    ends_at)``: what the search will run, and when its budget ends (``time.time()``; None); and
    ``note(text)``: one line about a choice made for the user (a backbone's image size)."""

    def trial_started(
        self, number: int, total: int | None, hyperparameters: dict[str, Any]
    ) -> None: ...
    def epoch_ended(self, epoch: int, epochs: int, logs: dict[str, float]) -> None: ...
    def trial_ended(self, record: TrialRecord) -> None: ...
    def final_training_started(self, epochs: int, epochs_found: int, examples: int) -> None: ...
    def final_training_ended(self, epochs: int, seconds: float) -> None: ...


def trial_record(trial: Any, run: RunDir) -> TrialRecord:
    """A KerasTuner trial plus the cost file cnnforge left in its folder."""
    cost = run.read_cost(trial.trial_id)
    status = str(trial.status)
    if status == "FAILED" and cost.get("over_budget"):
        status = OVER_BUDGET
    metrics = {
        name: float(trial.metrics.get_best_value(name))
        for name in trial.metrics.metrics
        if trial.metrics.get_best_value(name) is not None
    }
    return TrialRecord(
        trial_id=trial.trial_id,
        status=status,
        score=None if trial.score is None else float(trial.score),
        metrics=metrics,
        hyperparameters=dict(trial.hyperparameters.values),
        params=cost.get("params"),
        epochs=cost.get("epochs"),
        best_epoch=cost.get("best_epoch"),
        duration_s=cost.get("duration_s"),
        message=cost.get("error") or cost.get("note", ""),
        latency_ms=cost.get("latency_ms"),
        flops=cost.get("flops"),
        size_mb=cost.get("size_mb"),
        measure_s=cost.get("measure_s"),
        train_gflops=cost.get("train_gflops"),
        cores_busy=cost.get("cores_busy"),
        batch_size=cost.get("batch_size"),
        training=cost.get("training", ""),
    )


def mark_pareto_front(records: list[TrialRecord], objective: str) -> None:
    """Set ``pareto`` on the completed trials no other beats on the objective, latency and size."""
    points = [
        TrialPoint(r.trial_id, r.status, r.score, r.latency_ms, r.size_mb)
        for r in records
        if r.status == "COMPLETED"
    ]
    front = {p.trial_id for p in pareto_front(points, objective, with_size=True)}
    for record in records:
        record.pareto = record.trial_id in front


def trial_records(oracle: Any) -> list[TrialRecord]:
    """Every trial an oracle knows, in trial-id order, the Pareto front marked."""
    run = RunDir.of_tuner(oracle._project_dir)
    records = [
        trial_record(trial, run)
        for trial in sorted(oracle.trials.values(), key=lambda t: t.trial_id)
    ]
    mark_pareto_front(records, oracle.objective.name)
    return records


MEASURED = ("latency_ms", "flops", "size_mb", "measure_s", "train_gflops", "cores_busy")


def write_trials_csv(records: list[TrialRecord], run: RunDir) -> None:
    metric_names = sorted({m for r in records for m in r.metrics})
    hp_names = list(dict.fromkeys(h for r in records for h in r.hyperparameters))
    header = ["trial_id", "status", "score", *metric_names, "params", "epochs", "best_epoch"]
    header += ["duration_s", *MEASURED, "pareto", "batch_size", "training"]
    header += [f"hp_{h}" for h in hp_names] + ["message"]
    rows = [
        (
            [r.trial_id, r.status, r.score, *(r.metrics.get(m) for m in metric_names)]
            + [
                r.params,
                r.epochs,
                r.best_epoch,
                None if r.duration_s is None else round(r.duration_s, 3),
            ]
            + [_rounded(getattr(r, m)) for m in MEASURED]
            + [int(r.pareto), r.batch_size, r.training]
            + [r.hyperparameters.get(h) for h in hp_names]
            + [r.message]
        )
        for r in records
    ]
    run.write_trials(header, rows)


def _rounded(value: float | None) -> float | None:
    return value if value is None or isinstance(value, int) else round(value, 4)
