"""KerasTuner is patched for a search only: atomic state writes, and its traceback printing
decided when the search starts (``--debug``), not when cnnforge was imported."""

from __future__ import annotations

import threading
import time

import keras_tuner
import pytest

from cnnforge.tuning import oracles, tuners
from cnnforge.tuning.config import SearchConfig
from cnnforge.tuning.process import DEBUG_ENV, search_context


def test_settings_hold_inside_a_search_and_are_restored_after():
    original = keras_tuner.src.utils.save_json, keras_tuner.src.config.DEBUG
    assert original[0] is not tuners._save_json_atomically  # importing cnnforge patched nothing
    with tuners.kerastuner_settings(debug=True):
        assert keras_tuner.src.utils.save_json is tuners._save_json_atomically
        assert keras_tuner.src.config.DEBUG is True
    assert (keras_tuner.src.utils.save_json, keras_tuner.src.config.DEBUG) == original


def test_settings_are_restored_when_the_search_fails():
    original = keras_tuner.src.utils.save_json
    with pytest.raises(RuntimeError), tuners.kerastuner_settings(debug=False):
        raise RuntimeError("a trial blew up")
    assert keras_tuner.src.utils.save_json is original


@pytest.mark.parametrize(("variable", "expected"), [(None, False), ("1", True)])
def test_debug_is_read_when_the_search_starts(monkeypatch, variable, expected):
    if variable is None:
        monkeypatch.delenv(DEBUG_ENV, raising=False)
    else:
        monkeypatch.setenv(DEBUG_ENV, variable)  # set after cnnforge was imported
    with search_context(SearchConfig(), debug=None):
        assert keras_tuner.src.config.DEBUG is expected
    with search_context(SearchConfig(), debug=not expected):
        assert keras_tuner.src.config.DEBUG is (not expected)


def _oracle(tmp_path) -> keras_tuner.Oracle:
    hps = keras_tuner.HyperParameters()
    hps.Int("units", 1, 100)
    oracle = oracles.ORACLES["random"](
        objective=keras_tuner.Objective("val_accuracy", "max"),
        hyperparameters=hps,
        max_trials=10,
        seed=1,
    )
    oracle._set_project_dir(str(tmp_path / "run"), "tuner")
    return oracle


def _returns_in_time(call) -> bool:
    done = threading.Thread(target=call, daemon=True)
    done.start()
    done.join(timeout=10)
    return not done.is_alive()


def test_an_error_inside_an_oracle_call_releases_its_lock(tmp_path, monkeypatch):
    """KerasTuner's lock around oracle calls has no try/finally: a failure writing trials.csv
    inside ``end_trial`` left it held, and every later call (the chief's watch) hung."""
    oracle = _oracle(tmp_path)
    trial = oracle.create_trial("w1")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(oracles, "write_trials_csv", disk_full)
    trial.status = "FAILED"
    with pytest.raises(OSError, match="No space left"):
        oracle.end_trial(trial)
    assert _returns_in_time(lambda: oracle.create_trial("w2"))


def test_failures_in_a_row_stop_every_tuner_with_the_reason(tmp_path):
    """Three FAILED trials in a row end normally (saved, no longer running), then every tuner
    is answered STOPPED with the reason, and a running trial is told to stop."""
    oracle = _oracle(tmp_path)
    running = oracle.create_trial("w2")
    for _ in range(3):
        trial = oracle.create_trial("w1")
        trial.status, trial.message = "FAILED", "Traceback...\nFailedTrialError: MemoryError: oom"
        oracle.end_trial(trial)
    assert "w1" not in oracle.ongoing_trials
    assert oracle.failure == "3 trial(s) failed, the last 3 in a row (last: MemoryError: oom)"
    assert oracle.update_trial(running.trial_id, {"val_accuracy": 0.5}).status == "STOPPED"
    for tuner_id in ("w1", "w2"):
        stopped = oracle.create_trial(tuner_id)
        assert stopped.status == "STOPPED" and oracles.stop_reason(stopped) == oracle.failure
    assert not oracle.tuner_ids and not oracle.ongoing_trials  # a chief may exit


def test_a_tuner_stopped_by_the_deadline_no_longer_keeps_a_chief(tmp_path):
    """KerasTuner's chief exits once no tuner is left; one answered STOPPED at the deadline
    stayed among them until its lease ran out (300 s by default) past the budget."""
    oracle = _oracle(tmp_path)
    trial = oracle.create_trial("w1")
    trial.status = "COMPLETED"
    oracle.update_trial(trial.trial_id, {"val_accuracy": 0.5})
    oracle.end_trial(trial)
    oracle.deadline = time.time() - 1
    assert oracle.create_trial("w1").status == "STOPPED"
    assert not oracle.tuner_ids and not oracle.ongoing_trials
