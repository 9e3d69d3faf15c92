"""Experiment tracking: what a search logs to TensorBoard (the default) and MLflow (``--track
mlflow``, the ``mlflow`` extra).

``open_tracking`` gives a ``Tracking``: it fans every event out to the trackers asked for and
turns any tracker's failure into one ``CnnforgeWarning`` line, after which that tracker is
dropped: tracking never breaks a search. Trackers get plain values (dicts, paths), so this
package knows nothing of the stages that call it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from cnnforge.core.errors import CnnforgeError, CnnforgeWarning

TRACKERS = ("tensorboard", "mlflow")
DEFAULT_TRACK = ("tensorboard",)


class Tracker(Protocol):
    """One tracking backend. ``trial`` and ``best`` are rows of trials.csv as dicts
    (``trial_id``, ``status``, ``score``, ``metrics``, ``hyperparameters``, ``params``,
    ``latency_ms``, ``size_mb``, ``flops``, ``duration_s``, ``message``)."""

    name: str

    def search_started(self, search: Mapping[str, Any], hyperparameters: Sequence[str]) -> None: ...
    def trial_started(self, trial_id: str, hyperparameters: Mapping[str, Any]) -> None: ...
    def epoch_ended(self, trial_id: str, epoch: int, scalars: Mapping[str, float]) -> None: ...
    def trial_ended(self, trial: Mapping[str, Any]) -> None: ...
    def search_ended(self, best: Mapping[str, Any] | None) -> None: ...
    def winner(self, artifacts: Sequence[Path], onnx: Path | None) -> None: ...
    def close(self) -> None: ...


def parse_track(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """``--track`` values (repeated or comma-separated) as tracker names; ``none`` alone, or
    nothing: no tracking; None: the default. Unknown names are a one-line error."""
    if values is None:
        return DEFAULT_TRACK
    if isinstance(values, str):
        values = [values]
    names = [n.strip().lower() for v in values for n in str(v).split(",") if n.strip()]
    if names == ["none"]:
        return ()
    if "none" in names:
        raise CnnforgeError("--track none means no tracking; give it alone")
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise CnnforgeError(
            f"--track takes {', '.join(TRACKERS)} or none; got {', '.join(unknown)}"
        )
    return tuple(dict.fromkeys(names))


class Tracking:
    """The trackers of one search (or of one ``cnnforge run``'s winner), as one.

    Shared, never copied: KerasTuner deep-copies each trial's callbacks, and the callback
    from ``callback()`` must log through these very trackers."""

    def __init__(self, trackers: Iterable[Tracker] = ()) -> None:
        self._live: list[Tracker] = list(trackers)
        self._started: set[str] = set()
        self._with_epochs: set[str] = set()

    def __deepcopy__(self, memo: dict) -> Tracking:
        return self

    @property
    def names(self) -> list[str]:
        """The trackers still logging."""
        return [t.name for t in self._live]

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self._live):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # any failure of a tracker: warn once, drop it
                self.drop(tracker, exc)

    def drop(self, tracker: Tracker, exc: BaseException) -> None:
        """Stop logging to ``tracker`` after ``exc``, with one warning line."""
        self._live.remove(tracker)
        lines = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
        warnings.warn(
            f"tracking with {tracker.name} stopped ({why}); the search goes on without it",
            CnnforgeWarning,
            stacklevel=3,
        )
        with contextlib.suppress(Exception):  # it failed already, and was reported
            tracker.close()

    def search_started(self, search: Mapping[str, Any], hyperparameters: Sequence[str]) -> None:
        self._each("search_started", search, hyperparameters)

    def trial_started(self, trial_id: str, hyperparameters: Mapping[str, Any]) -> None:
        self._started.add(trial_id)
        self._each("trial_started", trial_id, hyperparameters)

    def epoch_ended(self, trial_id: str, epoch: int, scalars: Mapping[str, float]) -> None:
        self._with_epochs.add(trial_id)
        self._each("epoch_ended", trial_id, epoch, scalars)

    def trial_ended(
        self, trial: Mapping[str, Any], history: Mapping[str, Sequence[float]] | None = None
    ) -> None:
        """A trial's end; one that ran elsewhere (a distributed worker) is started and its
        epochs logged from ``history`` (metric name → value per epoch) first."""
        trial_id = str(trial["trial_id"])
        if trial_id not in self._started:
            self.trial_started(trial_id, trial.get("hyperparameters", {}))
        if trial_id not in self._with_epochs and history:
            for epoch in range(max(len(v) for v in history.values())):
                scalars = {k: v[epoch] for k, v in history.items() if epoch < len(v)}
                self.epoch_ended(trial_id, epoch, scalars)
        self._each("trial_ended", trial)
        self._started.discard(trial_id)
        self._with_epochs.discard(trial_id)

    def search_ended(self, best: Mapping[str, Any] | None) -> None:
        self._each("search_ended", best)

    def winner(self, artifacts: Sequence[Path], onnx: Path | None) -> None:
        """The winner's files (those that exist), and its ONNX model to register."""
        self._each("winner", [Path(p) for p in artifacts if Path(p).is_file()], onnx)

    def close(self) -> None:
        self._each("close")
        self._live.clear()

    def callback(self, trial_id: str, batch_size: int | None) -> Any:
        """A Keras callback that logs each epoch of ``trial_id``'s training."""
        from cnnforge.tracking.callback import EpochScalars

        return EpochScalars(
            lambda epoch, scalars: self.epoch_ended(trial_id, epoch, scalars), batch_size
        )


def open_tracking(
    run_dir: Path,
    track: Sequence[str],
    *,
    model_name: str,
) -> Tracking:
    """The trackers ``track`` names for the run directory ``run_dir`` (a resumed search, or a
    pipeline after its search, continues the runs the directory records), for a search of
    ``model_name``. A tracker that cannot start (say, MLflow is not installed) is one warning
    line, and the others go on."""
    tracking = Tracking()
    for name in track:
        try:
            tracking._live.append(_make(name, Path(run_dir), model_name))
        except Exception as exc:
            tracking._live.append(_Failed(name))
            tracking.drop(tracking._live[-1], exc)
    return tracking


def _make(name: str, run_dir: Path, model_name: str) -> Tracker:
    if name == "tensorboard":
        from cnnforge.tracking.tensorboard import TensorBoardTracker

        return TensorBoardTracker(run_dir)
    if name == "mlflow":
        from cnnforge.tracking.mlflow import MlflowTracker

        return MlflowTracker(run_dir, model_name)
    raise CnnforgeError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")


class _Failed:
    """Stands for a tracker that could not start, so that it is reported like any other."""

    def __init__(self, name: str) -> None:
        self.name = name

    def close(self) -> None:
        pass
