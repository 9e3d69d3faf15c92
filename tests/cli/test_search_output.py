"""What a search prints: one plain line per trial, readable in a log as in a terminal."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from cnnforge.cli import output
from cnnforge.tuning.records import TrialRecord

WINNER = {"filters_0": 32, "learning_rate": 0.003, "flip": True, "tuner/epochs": 8}


def record(trial_id: str, score: float | None, **changed) -> TrialRecord:
    status = "COMPLETED" if score is not None else "FAILED"
    hps = {**WINNER, **changed}
    return TrialRecord(trial_id, status, score, {}, hps, params=1000, epochs=8, duration_s=12.3)


def printed(monkeypatch, show) -> list[str]:
    log = io.StringIO()
    narrow = Console(file=log, width=60, highlight=False, soft_wrap=True)  # as output.console
    monkeypatch.setattr(output, "console", narrow)
    show()
    return log.getvalue().splitlines()


def test_the_trials_table_is_one_unwrapped_line_a_trial_showing_what_differs(monkeypatch):
    trials = [
        record("0", 0.90, filters_0=64, learning_rate=0.0012345, flip=False, dense=128),
        record("1", 0.91),
        record("2", None, flip=False),
    ]
    result = SimpleNamespace(trials=trials, objective="val_accuracy", best_trial=trials[1])
    lines = printed(monkeypatch, lambda: output.print_trials(result))
    assert len(lines) == 2 + len(trials)  # title, header, a line per trial: none wrapped
    assert lines[2].startswith("#1") and lines[2].endswith("(winner)")
    # the search's winner leads even where a shorter trial scored higher (auto)
    result.best_trial = trials[0]
    lines = printed(monkeypatch, lambda: output.print_trials(result))
    assert lines[2].startswith("#0") and lines[2].endswith("(winner)")
    assert lines[3].startswith("#1") and "filters_0=32" in lines[3]
    result.best_trial = trials[1]
    lines = printed(monkeypatch, lambda: output.print_trials(result))
    assert (
        lines[3].startswith("#0")
        and "filters_0=64, learning_rate=0.00123, flip=False, +1" in (lines[3])
    )
    assert "tuner/" not in "".join(lines)
    assert lines[4].startswith("#2") and "FAILED" in lines[4] and lines[4].endswith("flip=False")


def test_the_trials_table_says_whose_training_recipe_the_trials_had(monkeypatch):
    trials = [record("0", 0.90), record("1", 0.91)]
    for trial in trials:
        trial.training = "the model's own (batch 32)"
    result = SimpleNamespace(trials=trials, objective="val_accuracy", best_trial=trials[1])
    lines = printed(monkeypatch, lambda: output.print_trials(result))
    assert lines[1] == "training recipe: the model's own (batch 32)"
    assert lines[3].startswith("#1") and lines[3].endswith("(winner)")


def test_progress_says_the_best_so_far_and_the_time_left(monkeypatch):
    progress = output.RichSearchProgress("val_accuracy")

    def run():
        progress.search_planned("8 trials", ends_at=progress.started + 600)
        progress.trial_ended(record("0", 0.80))
        progress.trial_ended(record("1", 0.70))

    lines = printed(monkeypatch, run)
    assert lines[0].startswith("plan: 8 trials, 10:00 budget left") or "9:59" in lines[0]
    assert "val_accuracy 0.8000 (best 0.8000)" in lines[1]
    assert "val_accuracy 0.7000 (best 0.8000)" in lines[2]
    assert "elapsed" in lines[2] and "left" in lines[2] and "8 ep" in lines[2]
