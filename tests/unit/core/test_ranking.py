"""The one ranking rule: best score first in the objective's direction, and failed, over-budget
or unscored trials last whichever the direction, for trials.csv rows and TrialRecords alike."""

from __future__ import annotations

import math

import pytest

from cnnforge.core.objectives import best_first, rank_key, sorted_trials
from cnnforge.core.rundir import RunDir
from cnnforge.tuning.records import TrialRecord, write_trials_csv


def record(trial_id: str, score: float | None, status: str = "COMPLETED") -> TrialRecord:
    return TrialRecord(trial_id, status, score, metrics={}, hyperparameters={})


RECORDS = [
    record("0", None, "FAILED"),
    record("1", 0.50),
    record("2", None, "OVER_BUDGET"),
    record("3", 0.20),
    record("4", 0.90),
    record("5", math.nan),  # a diverged trial: no better than a failed one
]


def ids(trials) -> list[str]:
    return [t["trial_id"] if isinstance(t, dict) else t.trial_id for t in trials]


@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        ("val_loss", ["3", "1", "4", "0", "2", "5"]),  # smallest first, failed still last
        ("val_accuracy", ["4", "1", "3", "0", "2", "5"]),
    ],
)
def test_failed_trials_go_last_whatever_the_direction(objective, expected):
    assert ids(best_first(RECORDS, objective)) == expected


@pytest.mark.parametrize("objective", ["val_loss", "val_accuracy"])
def test_trials_csv_rows_and_records_rank_alike(tmp_path, objective):
    run = RunDir(tmp_path)
    write_trials_csv(RECORDS, run)
    rows = run.read_trials()
    assert ids(sorted_trials(rows, objective)) == ids(best_first(RECORDS, objective))
    assert ids(best_first(rows, objective)) == ids(best_first(RECORDS, objective))


def test_rank_key_reads_text_and_numbers():
    assert rank_key("0.3", descending=False) == rank_key(0.3, descending=False) == (0, 0.3)
    assert rank_key(0.3, descending=True) == (0, -0.3)
    for missing in (None, "", "nan", "inf", math.inf, "failed"):
        assert rank_key(missing, descending=True) == rank_key(missing, descending=False) == (1, 0.0)


def test_a_loss_column_sorts_smallest_first_with_blanks_last():
    rows = [
        {"trial_id": "0", "score": "", "val_loss": ""},
        {"trial_id": "1", "score": "0.9", "val_loss": "0.9"},
        {"trial_id": "2", "score": "0.4", "val_loss": "0.4"},
    ]
    assert ids(sorted_trials(rows, "val_accuracy", "val_loss")) == ["2", "1", "0"]
    assert ids(sorted_trials(rows, "val_loss")) == ["2", "1", "0"]
