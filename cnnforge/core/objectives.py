"""Which way a search objective points, and what follows from it: trials ranked best first,
and the Pareto front of objective against latency (and size).

Names with 'loss' are minimised, others maximised. One rule shared by the tuner, the trial
tables, the reports and the plots; imports nothing heavy."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnnforge.core.errors import CnnforgeError


def objective_direction(objective: str) -> str:
    return "min" if "loss" in objective else "max"


def higher_is_better(objective: str) -> bool:
    return objective_direction(objective) == "max"


@dataclass(frozen=True)
class TrialPoint:
    trial_id: str
    status: str
    score: float | None  # the search objective; None for a failed or running trial
    latency: float | None = None
    size: float | None = None  # ONNX size in MB


def as_number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def run_order(trial_id: str) -> tuple[int, str]:
    return (int(trial_id), trial_id) if trial_id.isdigit() else (math.inf, trial_id)


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
            return (0, *run_order(row["trial_id"]))
        value = as_number(row.get(column))
        if value is None:
            return (1, 0.0, row.get(column) or "")
        return (0, -value if descending else value, "")

    return sorted(trials, key=key)
