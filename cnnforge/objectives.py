"""Which way a search objective points: names with 'loss' are minimised, others maximised.

One rule shared by the tuner, the trial tables and the plots; imports nothing heavy."""

from __future__ import annotations


def objective_direction(objective: str) -> str:
    return "min" if "loss" in objective else "max"


def higher_is_better(objective: str) -> bool:
    return objective_direction(objective) == "max"
