"""The winner goes only to the trackers still alive at the search's end, not to every one the
configuration names: a tracker that failed during the search is not opened again."""

from __future__ import annotations

import warnings

import pytest

from cnnforge.core.rundir import RunDir
from cnnforge.pipeline import _track_winner, run
from cnnforge.tuning.search import SearchConfig


def test_the_winner_goes_only_to_the_trackers_that_logged_the_search(tmp_path):
    gone, alive = RunDir(tmp_path / "gone"), RunDir(tmp_path / "alive")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reopening nothing warns of nothing
        _track_winner(gone, (), "simple_cnn")  # tensorboard was asked for, and it stopped
    assert not (gone.path / "tensorboard").exists()
    _track_winner(alive, ("tensorboard",), "simple_cnn")
    assert (alive.path / "tensorboard").is_dir()


@pytest.mark.slow
def test_a_tracker_that_failed_in_the_search_is_not_opened_again_for_the_winner(
    small_npz, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, so no store can be made under it")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocked}/mlflow.db")
    config = SearchConfig(
        data=str(small_npz),
        run_dir=tmp_path / "run",
        max_trials=1,
        track=["mlflow"],
        epochs=1,
        patience=0,
        retrain=False,
        fix={"conv_blocks": "1"},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(config, bench_iterations=5, bench_min_duration_s=0.01)
    stopped = [str(w.message) for w in caught if "tracking with mlflow stopped" in str(w.message)]
    assert len(stopped) == 1, stopped  # the search's, not a second one for the winner
    assert result.search.tracked == () and result.report.is_file()
