"""The winner goes only to the trackers still alive at the search's end, not to every one the
configuration names: a tracker that failed during the search is not opened again."""

from __future__ import annotations

import warnings

from cnnforge.core.rundir import RunDir
from cnnforge.pipeline import _track_winner


def test_the_winner_goes_only_to_the_trackers_that_logged_the_search(tmp_path):
    gone, alive = RunDir(tmp_path / "gone"), RunDir(tmp_path / "alive")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reopening nothing warns of nothing
        _track_winner(gone, (), "simple_cnn")  # tensorboard was asked for, and it stopped
    assert not (gone.path / "tensorboard").exists()
    _track_winner(alive, ("tensorboard",), "simple_cnn")
    assert (alive.path / "tensorboard").is_dir()
