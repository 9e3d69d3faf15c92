"""KerasTuner is patched for a search only: atomic state writes, and its traceback printing
decided when the search starts (``--debug``), not when cnnforge was imported."""

from __future__ import annotations

import keras_tuner
import pytest

from cnnforge.tuning import tuners
from cnnforge.tuning.config import SearchConfig
from cnnforge.tuning.search import DEBUG_ENV, _search_context


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
    with _search_context(SearchConfig(), debug=None):
        assert keras_tuner.src.config.DEBUG is expected
    with _search_context(SearchConfig(), debug=not expected):
        assert keras_tuner.src.config.DEBUG is (not expected)


def test_too_many_failures_is_a_type_of_its_own():
    assert issubclass(tuners.TooManyFailures, RuntimeError)  # KerasTuner's engine handles it
    assert tuners.TooManyFailures is not RuntimeError
