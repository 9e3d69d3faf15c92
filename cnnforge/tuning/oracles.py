"""cnnforge's oracles: KerasTuner's, with what every cnnforge search adds to them (mixins).

- ``trials.csv`` is rewritten whenever a trial ends, wherever it ran.
- N failed trials in a row stop the search for every tuner, chief and workers alike, with the
  reason; a candidate refused for its budget is no failure.
- Past the deadline no trial starts, and a running trial's next epoch report is answered
  STOPPED (a distributed worker's trial stops too).
- A worker that falls silent for longer than its lease loses its trial to the next worker.
- ``auto`` runs the search's plan (``cnnforge.tuning.auto``); ``random``, ``bayesian`` and
  ``hyperband`` start with the default build (the baseline); ``grid`` survives a reload.
- Every oracle method takes KerasTuner's lock through ``synchronized``, which releases it when
  the call raises (KerasTuner's own leaves it held).
"""

from __future__ import annotations

import copy
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import keras_tuner

from cnnforge.core.contract import TUNERS
from cnnforge.core.rundir import RunDir
from cnnforge.tuning.auto import AutoOracle
from cnnforge.tuning.records import trial_records, write_trials_csv


def synchronized(method: Callable[..., Any]) -> Callable[..., Any]:
    """KerasTuner's ``synchronized`` (one call at a time per oracle, re-entrant within a thread,
    sharing KerasTuner's lock), but the lock is released when the call raises: KerasTuner's own
    leaves it held, and every later call (a distributed chief's watch, its exit) then hangs."""
    locks, owners = keras_tuner.src.engine.oracle.LOCKS, keras_tuner.src.engine.oracle.THREADS

    @functools.wraps(method)
    def locked(oracle: Any, *args: Any, **kwargs: Any) -> Any:
        thread = threading.current_thread().name
        if owners[oracle] == thread:
            return method(oracle, *args, **kwargs)
        with locks[oracle]:
            owners[oracle] = thread
            try:
                return method(oracle, *args, **kwargs)
            finally:
                owners[oracle] = None

    return locked


STOP_REASON = "cnnforge/stopped"  # the value a STOPPED trial carries the reason in, over gRPC


def stop_reason(trial: Any) -> str | None:
    """Why the oracle answered ``trial`` STOPPED (None: the search ran its course)."""
    return trial.hyperparameters.values.get(STOP_REASON)


class _RecordsTrials:
    """Oracle mixin: trials.csv is rewritten whenever a trial ends, wherever it ran."""

    @synchronized
    def end_trial(self, trial: Any) -> None:
        super().end_trial(trial)
        write_trials_csv(trial_records(self), RunDir.of_tuner(self._project_dir))


class _StopAfterFailures:
    """Oracle mixin: N FAILED trials in a row stop the search. KerasTuner raises inside
    ``end_trial``, leaving the trial unsaved and still running for a distributed chief; here
    the trial ends normally and ``failure`` is set: every tuner's next trial is STOPPED with
    the reason and a running trial stops at its next epoch, so chief and workers all end.

    A candidate refused for its budget is FAILED (so never ranked nor retried) but is no
    failure: it neither counts towards that limit nor breaks a run of real failures."""

    failure: str | None = None

    def _check_consecutive_failures(self) -> None:
        in_a_row, run = 0, RunDir.of_tuner(self._project_dir)
        for trial_id in self.end_order:
            trial = self.trials[trial_id]
            if trial.status != keras_tuner.engine.trial.TrialStatus.FAILED:
                in_a_row = 0
            elif not run.read_cost(trial_id).get("over_budget"):
                in_a_row += 1
            if in_a_row == self.max_consecutive_failed_trials:
                self.failure = self._failure_line(run)
                return

    def _failure_line(self, run: RunDir) -> str:
        failed = [
            t
            for t in self.end_order
            if self.trials[t].status == keras_tuner.engine.trial.TrialStatus.FAILED
            and not run.read_cost(t).get("over_budget")
        ]
        # the cost file holds the one-line reason; without a shared run directory, the last
        # line of the traceback KerasTuner sent
        last = run.read_cost(failed[-1]).get("error") or _last_line(self.trials[failed[-1]].message)
        return (
            f"{len(failed)} trial(s) failed, the last {self.max_consecutive_failed_trials} "
            f"in a row (last: {last})"
        )

    @synchronized
    def create_trial(self, tuner_id: str) -> Any:
        if self.failure is None:
            return super().create_trial(tuner_id)
        self.ongoing_trials.pop(tuner_id, None)
        self.tuner_ids.discard(tuner_id)  # a distributed chief exits once no tuner is left
        stopped = keras_tuner.engine.trial.Trial(
            self.hyperparameters.copy(), status=keras_tuner.engine.trial.TrialStatus.STOPPED
        )
        stopped.hyperparameters.values = {STOP_REASON: self.failure}
        return stopped

    @synchronized
    def update_trial(self, trial_id: str, metrics: dict, step: int = 0) -> Any:
        trial = super().update_trial(trial_id, metrics, step=step)
        if self.failure is not None:
            trial = copy.copy(trial)
            trial.status = keras_tuner.engine.trial.TrialStatus.STOPPED
        return trial


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1].split("FailedTrialError: ")[-1] if lines else "no reason given"


class _WorkerLeases:
    """Oracle mixin: a tuner that has neither asked for a trial nor finished an epoch for
    ``lease_seconds`` is taken for dead; its trial goes back in the queue for the next tuner,
    and it no longer keeps a distributed chief waiting."""

    lease_seconds: float | None = None

    def _last_seen(self) -> dict[str, float]:
        if not hasattr(self, "_seen"):
            self._seen: dict[str, float] = {}
        return self._seen

    @synchronized
    def create_trial(self, tuner_id: str) -> Any:
        self._last_seen()[tuner_id] = time.monotonic()
        self.expire_silent_tuners()
        if self._others_may_give_back(tuner_id):
            # Every trial is handed out, but another tuner may still die and give one back:
            # wait (IDLE) instead of stopping, so a trial is never left without a tuner.
            idle = keras_tuner.engine.trial.TrialStatus.IDLE
            return keras_tuner.engine.trial.Trial(self.hyperparameters.copy(), "idle", status=idle)
        return super().create_trial(tuner_id)

    def _others_may_give_back(self, tuner_id: str) -> bool:
        return bool(
            self.lease_seconds
            and self.max_trials
            and len(self.trials) >= self.max_trials
            and not self._retry_queue
            and tuner_id not in self.ongoing_trials
            and self.ongoing_trials
        )

    @synchronized
    def update_trial(self, trial_id: str, metrics: dict, step: int = 0) -> Any:
        for tuner_id, trial in self.ongoing_trials.items():
            if trial.trial_id == trial_id:
                self._last_seen()[tuner_id] = time.monotonic()
        return super().update_trial(trial_id, metrics, step=step)

    @synchronized
    def expire_silent_tuners(self) -> list[str]:
        """Re-queue the trials of silent tuners; return the ids of the tuners let go."""
        if not self.lease_seconds:
            return []
        now, seen = time.monotonic(), self._last_seen()
        silent = [
            tuner_id
            for tuner_id in {*self.tuner_ids, *self.ongoing_trials}
            if now - seen.setdefault(tuner_id, now) > self.lease_seconds
        ]
        for tuner_id in silent:
            trial = self.ongoing_trials.pop(tuner_id, None)
            if trial is not None:
                self._retry_queue.append(trial.trial_id)
            self.tuner_ids.discard(tuner_id)
            del seen[tuner_id]
        if silent:
            self.save()
        return silent


class _Deadline:
    """Oracle mixin: no trial starts after ``deadline`` (``time.time()``; None: no limit), which
    the tuner moves as trials end (``cnnforge.tuning.timebudget``)."""

    deadline: float | None = None

    @synchronized
    def create_trial(self, tuner_id: str) -> Any:
        if self.deadline is not None and time.time() >= self.deadline:
            self.tuner_ids.discard(tuner_id)  # as KerasTuner's STOPPED does: the chief may exit
            stopped = keras_tuner.engine.trial.TrialStatus.STOPPED
            return keras_tuner.engine.trial.Trial(self.hyperparameters.copy(), status=stopped)
        return super().create_trial(tuner_id)

    @synchronized
    def update_trial(self, trial_id: str, metrics: dict, step: int = 0) -> Any:
        """The trial, answered STOPPED once the deadline has passed: a distributed worker
        (which cannot see the chief's clock) stops its running trial at the next epoch."""
        trial = super().update_trial(trial_id, metrics, step=step)
        if self.deadline is not None and time.time() >= self.deadline:
            trial = copy.copy(trial)
            trial.status = keras_tuner.engine.trial.TrialStatus.STOPPED
        return trial


class _BaselineFirst:
    """Oracle mixin: the first trial is the default build, so a search never ends below baseline
    (Hyperband adds its bracket bookkeeping to it as to any sampled candidate)."""

    def _random_values(self) -> dict[str, Any] | None:
        if not self.trials:
            return {hp.name: hp.default for hp in self.hyperparameters.space}
        return super()._random_values()


class _ResumableGrid:
    """Oracle mixin for the grid: KerasTuner keeps its walk through the grid (the order of the
    tried trials and the queue of trials to expand) outside its saved state, so a reloaded grid
    search fails with a KeyError. This saves both and rebuilds them on reload."""

    def get_state(self) -> dict[str, Any]:
        order, ids = [], self._ordered_ids
        index = ids._next_index[None]
        while index is not None:
            order.append(ids._memory[index])
            index = ids._next_index[index]
        return {
            **super().get_state(),
            "grid_order": order,
            "populate_next": list(self._populate_next),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self._ordered_ids = keras_tuner.src.tuners.gridsearch.LinkedList()
        for trial_id in state.get("grid_order", []):
            self._ordered_ids.insert(trial_id)
        self._populate_next = list(state.get("populate_next", []))


_ORACLE_BASES = {
    "auto": (AutoOracle, keras_tuner.Oracle),
    "random": (_BaselineFirst, keras_tuner.oracles.RandomSearchOracle),
    "bayesian": (_BaselineFirst, keras_tuner.oracles.BayesianOptimizationOracle),
    "grid": (_ResumableGrid, keras_tuner.oracles.GridSearchOracle),  # starts from the defaults
    "hyperband": (_BaselineFirst, keras_tuner.oracles.HyperbandOracle),
}
assert tuple(_ORACLE_BASES) == TUNERS, "core.contract.TUNERS names every oracle"
ORACLES = {
    name: type(
        bases[-1].__name__,
        (_RecordsTrials, _StopAfterFailures, _Deadline, _WorkerLeases, *bases),
        {},
    )
    for name, bases in _ORACLE_BASES.items()
}
