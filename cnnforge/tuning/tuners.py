"""cnnforge's additions to KerasTuner's engine: what is recorded per trial, and the oracles.

- Every oracle rewrites ``trials.csv`` when a trial ends, from KerasTuner's state plus the cost
  file each trial leaves beside it (``tuner/trial_N/cnnforge_cost.json``): parameters, epochs,
  seconds, and the failure reason. Local searches and a distributed chief work the same way.
- Before training, each candidate is exported and timed with onnxruntime (``cnnforge.tuning.candidate``);
  one over the budget is not trained: it ends FAILED for KerasTuner (never ranked, never retried,
  not counted among consecutive failures) and OVER_BUDGET in trials.csv, with the reason.
- ``auto`` runs the search's plan (``cnnforge.tuning.auto``); ``random``, ``bayesian`` and
  ``hyperband`` start with the default build (the baseline).
- Past the time budget's deadline no trial starts, and a running trial's next epoch report is
  answered STOPPED (a distributed worker's trial stops too).
- ``grid`` survives a reload (KerasTuner's forgets its walk through the grid).
- A worker that falls silent for longer than its lease loses its trial to the next worker.
- KerasTuner's state files are written atomically (below).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import keras
import keras_tuner

from cnnforge.core.atomic import atomic_write_text
from cnnforge.core.contract import TUNERS
from cnnforge.core.objectives import objective_direction
from cnnforge.core.rundir import RunDir
from cnnforge.modeling.hypermodel import may_pick_its_batch_size
from cnnforge.modeling.training import SAFETY, learning_rate_schedule
from cnnforge.tracking import Tracking
from cnnforge.tuning.auto import EPOCHS, AutoOracle
from cnnforge.tuning.candidate import Budget, Target, measure_candidate
from cnnforge.tuning.plan import SearchPlan
from cnnforge.tuning.records import SearchProgress, trial_record, trial_records, write_trials_csv
from cnnforge.tuning.timebudget import TimeBudget, pace


def _save_json_atomically(path: str, obj: Any) -> str:
    """KerasTuner's ``utils.save_json``, but written to a temporary name and renamed."""
    text = json.dumps(obj)
    atomic_write_text(Path(path), text)
    return text


@contextlib.contextmanager
def kerastuner_settings(*, debug: bool) -> Iterator[None]:
    """KerasTuner as a search needs it, for the search only (restored after):

    - KerasTuner writes its oracle, tuner and trial state in place: a job killed mid-write would
      leave a truncated JSON file that cannot be resumed. Every KerasTuner module calls
      ``utils.save_json`` through the module, so replacing it there makes all those writes atomic.
    - KerasTuner prints the traceback of every failed trial; cnnforge records the reason in
      trials.csv instead, and shows tracebacks only when ``debug``.
    """
    utils, config = keras_tuner.src.utils, keras_tuner.src.config
    saved = utils.save_json, config.DEBUG
    utils.save_json, config.DEBUG = _save_json_atomically, debug
    try:
        yield
    finally:
        utils.save_json, config.DEBUG = saved


class TooManyFailures(RuntimeError):
    """KerasTuner's limit of failed trials in a row was reached. A RuntimeError, like the error
    KerasTuner raises there, so its engine treats it the same; cnnforge catches this type."""


# --- oracles ---------------------------------------------------------------------------------


class _RecordsTrials:
    """Oracle mixin: trials.csv is rewritten whenever a trial ends, wherever it ran."""

    @keras_tuner.synchronized
    def end_trial(self, trial: Any) -> None:
        super().end_trial(trial)
        write_trials_csv(trial_records(self), RunDir.of_tuner(self._project_dir))


class _OverBudgetIsNoFailure:
    """Oracle mixin: KerasTuner stops a search after N FAILED trials in a row; a candidate
    refused for its budget is FAILED (so never ranked nor retried) but is no failure: it
    neither counts towards that limit nor breaks a run of real failures."""

    def _check_consecutive_failures(self) -> None:
        in_a_row = 0
        for trial_id in self.end_order:
            trial = self.trials[trial_id]
            if trial.status != keras_tuner.engine.trial.TrialStatus.FAILED:
                in_a_row = 0
            elif not RunDir.of_tuner(self._project_dir).read_cost(trial_id).get("over_budget"):
                in_a_row += 1
            if in_a_row == self.max_consecutive_failed_trials:
                raise TooManyFailures(
                    "Number of consecutive failures exceeded the limit "
                    f"of {self.max_consecutive_failed_trials}.\n{trial.message or ''}"
                )


class _WorkerLeases:
    """Oracle mixin: a tuner that has neither asked for a trial nor finished an epoch for
    ``lease_seconds`` is taken for dead; its trial goes back in the queue for the next tuner,
    and it no longer keeps a distributed chief waiting."""

    lease_seconds: float | None = None

    def _last_seen(self) -> dict[str, float]:
        if not hasattr(self, "_seen"):
            self._seen: dict[str, float] = {}
        return self._seen

    @keras_tuner.synchronized
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

    @keras_tuner.synchronized
    def update_trial(self, trial_id: str, metrics: dict, step: int = 0) -> Any:
        for tuner_id, trial in self.ongoing_trials.items():
            if trial.trial_id == trial_id:
                self._last_seen()[tuner_id] = time.monotonic()
        return super().update_trial(trial_id, metrics, step=step)

    @keras_tuner.synchronized
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

    @keras_tuner.synchronized
    def create_trial(self, tuner_id: str) -> Any:
        if self.deadline is not None and time.time() >= self.deadline:
            stopped = keras_tuner.engine.trial.TrialStatus.STOPPED
            return keras_tuner.engine.trial.Trial(self.hyperparameters.copy(), status=stopped)
        return super().create_trial(tuner_id)

    @keras_tuner.synchronized
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
        (_RecordsTrials, _OverBudgetIsNoFailure, _Deadline, _WorkerLeases, *bases),
        {},
    )
    for name, bases in _ORACLE_BASES.items()
}


# --- tuners ----------------------------------------------------------------------------------


class NonFiniteLoss(keras.callbacks.Callback):
    """Fail the trial as soon as the loss is NaN or infinite, saying at which epoch."""

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss} at epoch {epoch + 1}; lower the learning rate"
            )


class PatienceUnlessScheduled(keras.callbacks.EarlyStopping):
    """Early stopping for a constant learning rate only: a decaying schedule (cosine) does its
    best at its end, and stopping it early would keep its high-rate epochs and cut the rest."""

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        self.scheduled = learning_rate_schedule(self.model.optimizer) is not None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.scheduled:
            super().on_epoch_end(epoch, logs)


class StopAtDeadline(keras.callbacks.Callback):
    """Stop training (after the current batch) once ``deadline()`` has passed."""

    def __init__(self, deadline: Any) -> None:
        super().__init__()
        self.deadline = deadline

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        deadline = self.deadline()
        if deadline is not None and time.time() >= deadline:
            self.model.stop_training = True


def _failure_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


class _HyperbandWithOracle(keras_tuner.Hyperband):
    """Hyperband's way of running trials (epochs set per bracket) with an oracle cnnforge built."""

    def __init__(self, oracle: Any, **kwargs: Any) -> None:
        keras_tuner.Tuner.__init__(self, oracle=oracle, **kwargs)


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it. tf2onnx and clearing a Keras
    session run many weakref callbacks, and a KeyboardInterrupt raised inside one is printed
    and ignored by Python: the search would go on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class OverBudget(Exception):
    """A candidate costs more than the search's budget allows; it is not trained."""


class RecordingTuner(keras_tuner.Tuner):
    """Runs trials, leaving each one's cost (or failure reason) beside it, with progress events
    and a heartbeat to the oracle after every epoch (which also keeps a worker's lease).

    Before training, each candidate is measured on ``target`` (None: not measured) and refused
    when over ``budget``. Trials, and each epoch of their training, are logged to ``tracking``
    (set by the search; none by default).
    """

    def __init__(
        self,
        *args: Any,
        progress: SearchProgress | None,
        budget: Budget | None = None,
        target: Target | None = None,
        time_budget: TimeBudget | None = None,
        plan: SearchPlan | None = None,
        **kwargs: Any,
    ) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # KerasTuner prints "Reloading Tuner"
            super().__init__(*args, **kwargs)
        self.progress = progress
        self.budget = budget or Budget()
        self.target = target
        self.time_budget = time_budget
        self.plan = plan
        self.trial_epochs = 0  # of the trial running
        self.move_deadline()
        self.trials_run: list[str] = []
        self.tracking = Tracking()
        self._measured: dict[str, dict[str, Any]] = {}  # Hyperband runs a candidate again

    def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
        self.trials_run.append(trial.trial_id)
        values = trial.hyperparameters.values
        self.trial_epochs = values.get(EPOCHS, kwargs.get("epochs", 1))
        if self.progress:
            total = getattr(self.oracle, "max_trials", None)
            self.progress.trial_started(
                int(trial.trial_id) + 1, total, trial.hyperparameters.values
            )
        self.tracking.trial_started(trial.trial_id, trial.hyperparameters.values)
        start = time.perf_counter()
        cost: dict[str, Any] = {}
        try:
            cost.update(self.measure(trial.hyperparameters))
            reasons = self.budget.violations(cost)
            if reasons:
                cost["over_budget"] = "; ".join(reasons)
                raise OverBudget(cost["over_budget"])
            # a lambda, not the oracle: KerasTuner deep-copies the callbacks of every trial
            stop = StopAtDeadline(lambda: getattr(self.oracle, "deadline", None))
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), stop]
            if self.tracking.names:
                # a plugin's own fit or compile picks its own batch size: no throughput from ours
                plugin = getattr(self.hypermodel, "plugin", None)
                own_batch = plugin is not None and may_pick_its_batch_size(plugin)
                batch = None if own_batch else kwargs.get("batch_size")
                tracked = self.tracking.callback(trial.trial_id, batch)
                kwargs["callbacks"].append(tracked)
            result = super().run_trial(trial, *args, **kwargs)
            deadline = getattr(self.oracle, "deadline", None)
            if deadline is not None and time.time() >= deadline:
                cost["note"] = "cut short by the time budget"
            return result
        except OverBudget as exc:
            cost["error"] = f"over budget: {exc}"
            raise keras_tuner.errors.FailedTrialError(cost["error"]) from None
        except Exception as exc:
            # Any failure of one trial (a plugin that raises, out of memory, NaN loss) is
            # recorded with its reason; KerasTuner counts FAILED trials in a row.
            cost["error"] = _failure_reason(exc)
            raise keras_tuner.errors.FailedTrialError(cost["error"]) from exc
        finally:
            cost.update(self.hypermodel.last_fit, duration_s=time.perf_counter() - start)
            cost["best_epoch"] = self._best_epoch(cost)
            cost["train_gflops"] = training_gflops(cost)
            self.run.write_cost(trial.trial_id, cost)
            self.hypermodel.last_fit = {}

    @property
    def run(self) -> RunDir:
        """The run directory this tuner's trials are recorded in."""
        return RunDir.of_tuner(self.project_dir)

    def _best_epoch(self, cost: dict[str, Any]) -> int | None:
        """How many epochs (from scratch, counting a continued trial's earlier rounds) it took
        to reach the trial's best objective value."""
        values = cost.get("history", {}).get(self.oracle.objective.name)
        if not values:
            return None
        best = (max if self.oracle.objective.direction == "max" else min)(values)
        return cost.get("initial_epoch", 0) + values.index(best) + 1

    def best_cost(self) -> dict[str, Any]:
        """The cost record of the best trial so far (empty before one has ended)."""
        best = self.oracle.get_best_trials(1)
        return self.run.read_cost(best[0].trial_id) if best else {}

    def move_deadline(self) -> None:
        """Let trials run until the time left is what the final training needs: the auto
        plan's share for it, or what retraining the best trial so far will take."""
        if self.time_budget is None:
            return
        if self.plan is not None and self.plan.final_epoch_seconds:
            # the plan's share for the final training, whichever trial leads now: a slower
            # leader trains fewer epochs at the end rather than cut the search short
            keep = self.plan.final_seconds(margin=SAFETY)
            self.oracle.deadline = self.time_budget.ends_at - self.time_budget.overhead - keep
            return
        best = self.best_cost()
        self.oracle.deadline = self.time_budget.search_deadline(pace(best), self.final_epochs(best))

    def final_epochs(self, best: dict[str, Any]) -> int:
        """The epochs the winner's final training wants: the plan's, else the epochs the
        best trial took to its best."""
        if self.plan is not None and self.plan.final_epochs:
            return self.plan.final_epochs
        return best.get("best_epoch") or best.get("epochs") or 1

    def measure(self, hp: keras_tuner.HyperParameters) -> dict[str, Any]:
        """The candidate's deployment cost, measured once per candidate. Without a budget, a
        candidate that cannot be measured (say, tf2onnx cannot convert it) is still trained."""
        if self.target is None:
            return {}
        key = json.dumps(
            {k: v for k, v in sorted(hp.values.items()) if not k.startswith("tuner/")},
            default=str,
        )
        if key not in self._measured:
            with _interrupt_after():
                self._measured[key] = self._measure_once(hp)
        return self._measured[key]

    def _measure_once(self, hp: keras_tuner.HyperParameters) -> dict[str, Any]:
        try:
            return measure_candidate(self.hypermodel.build(hp), self.target)  # type: ignore[arg-type]
        except Exception as exc:
            if self.budget.limits():
                raise
            return {"measure_error": _failure_reason(exc)}
        finally:
            keras.backend.clear_session()

    def pre_create_trial(self) -> None:
        # KerasTuner asks again at once when the oracle answers IDLE; ask once a second instead.
        if getattr(self, "_asked_in_vain", False):
            time.sleep(1.0)
        self._asked_in_vain = True

    def on_trial_begin(self, trial: Any) -> None:
        self._asked_in_vain = False
        super().on_trial_begin(trial)

    def on_epoch_end(self, trial: Any, model: Any, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(trial, model, epoch, logs)
        objective = self.oracle.objective.name
        if logs and objective in logs:
            answer = self.oracle.update_trial(
                trial.trial_id, {objective: float(logs[objective])}, step=epoch
            )
            if getattr(answer, "status", None) == keras_tuner.engine.trial.TrialStatus.STOPPED:
                model.stop_training = True  # the chief's deadline passed

    def on_trial_end(self, trial: Any) -> None:
        super().on_trial_end(trial)
        self.move_deadline()
        if self.progress or self.tracking.names:
            self.report_trial_end(self.oracle.get_trial(trial.trial_id))

    def report_trial_end(self, trial: Any) -> None:
        """Tell the front end and the trackers that ``trial`` (as the oracle has it) ended."""
        record = trial_record(trial, self.run)
        if self.progress:
            self.progress.trial_ended(record)
        history = self.run.read_cost(trial.trial_id).get("history")
        self.tracking.trial_ended(asdict(record), history)


class RecordingHyperband(RecordingTuner, _HyperbandWithOracle):
    pass


class RecordingAuto(RecordingTuner):
    """Each trial of the auto plan trains for the epochs its rung gives it, from scratch."""

    def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["epochs"] = trial.hyperparameters.values[EPOCHS]
        return super().run_trial(trial, *args, **kwargs)


def training_gflops(cost: dict[str, Any]) -> float | None:
    """The trainer's pace in GFLOP/s over its steady steps: a training step costs about three
    forward passes (forward, and the gradients of activations and of weights)."""
    if not cost.get("flops") or not cost.get("steady_examples") or not cost.get("steady_seconds"):
        return None
    return 3 * cost["flops"] * cost["steady_examples"] / cost["steady_seconds"] / 1e9


def make_tuner(
    tuner: str,
    *,
    objective: str,
    max_trials: int,
    epochs: int,
    seed: int,
    hyperparameters: keras_tuner.HyperParameters,
    lease_seconds: float | None,
    budget: Budget | None = None,
    target: Target | None = None,
    time_budget: TimeBudget | None = None,
    plan: SearchPlan | None = None,
    priors: list[dict[str, Any]] | None = None,
    **tuner_kwargs: Any,
) -> RecordingTuner:
    """The tuner named ``tuner`` over cnnforge's oracle for it (``auto`` runs ``plan`` over the
    plugin's ``priors``)."""
    oracle_kwargs = dict(
        objective=keras_tuner.Objective(objective, objective_direction(objective)),
        hyperparameters=hyperparameters,
        tune_new_entries=True,
        seed=seed,
    )
    if tuner == "hyperband":
        oracle = ORACLES[tuner](max_epochs=epochs, **oracle_kwargs)
    elif tuner == "auto":
        if plan is None:
            raise ValueError("the auto tuner runs a plan: pass plan=")
        oracle = ORACLES[tuner](max_trials=plan.trials, **oracle_kwargs)
        # KerasTuner replaces a seed of 0 with a random one: the search's own is kept
        oracle.plan, oracle.priors, oracle.search_seed = plan, list(priors or []), seed
    else:
        oracle = ORACLES[tuner](max_trials=max_trials, **oracle_kwargs)
    oracle.lease_seconds = lease_seconds
    tuner_class = {"hyperband": RecordingHyperband, "auto": RecordingAuto}.get(
        tuner, RecordingTuner
    )
    return tuner_class(
        oracle=oracle,
        budget=budget,
        target=target,
        time_budget=time_budget,
        plan=plan,
        **tuner_kwargs,
    )
