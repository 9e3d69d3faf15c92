"""Which way a search objective points, and what follows from it: trials ranked best first,
and the Pareto front of objective against latency (and size).

Names with 'loss' are minimised, others maximised. One rule shared by the tuner, the trial
tables, the reports and the plots; imports nothing heavy."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cnnforge.core.errors import CnnforgeError

T = TypeVar("T")


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


def as_number(text: str | float | None) -> float | None:
    """A trials.csv cell (or a number) as a finite float; None if empty, not a number, or not
    finite."""
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


def rank_key(value: str | float | None, descending: bool) -> tuple[int, float]:
    """The one ranking rule: best value first (``descending`` for a maximised objective), and
    trials without a finite value (failed, over budget, still running) last, whichever the
    direction."""
    number = as_number(value)
    if number is None:
        return (1, 0.0)
    return (0, -number if descending else number)


def _score(trial: Any) -> str | float | None:
    """The objective score of a trials.csv row (text) or of a ``TrialRecord`` (a number)."""
    return trial.get("score") if isinstance(trial, Mapping) else trial.score


def best_first(
    trials: Iterable[T],
    objective: str,
    score: Callable[[T], str | float | None] = _score,
) -> list[T]:
    """Trials best first by ``score`` for the objective's direction; unscored ones last, in
    their given order."""
    descending = higher_is_better(objective)
    return sorted(trials, key=lambda trial: rank_key(score(trial), descending))


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
        return best_first(trials, objective)
    if column == "trial_id":
        return sorted(trials, key=lambda row: run_order(row["trial_id"]))
    if "accuracy" in column or "loss" in column:  # a metric
        descending = higher_is_better(column)
    else:  # a cost (latency, size, params...), or pareto (front first)
        descending = column == "pareto"

    def key(row: dict[str, str]) -> tuple[int, float, str]:
        cell = row.get(column)
        # text cells (status, message) sort alphabetically after the numbers
        return (*rank_key(cell, descending), "" if as_number(cell) is not None else cell or "")

    return sorted(trials, key=key)
