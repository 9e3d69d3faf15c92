"""cnnforge's tuners over KerasTuner's engine (its oracles: ``cnnforge.tuning.oracles``).

- Each trial leaves its cost file beside it (``tuner/trial_N/cnnforge_cost.json``): parameters,
  epochs, seconds, and the failure reason; the oracles rewrite ``trials.csv`` from it.
- Before training, each candidate is exported and timed with onnxruntime (``cnnforge.tuning.candidate``);
  one over the budget is not trained: it ends FAILED for KerasTuner (never ranked, never retried,
  not counted among consecutive failures) and OVER_BUDGET in trials.csv, with the reason.
- A trial stops at the time budget's deadline (after the current batch), or when the oracle
  answers an epoch's report STOPPED (a distributed chief's deadline, or failures in a row).
- KerasTuner's state files are written atomically (below).
"""

from __future__ import annotations

import contextlib
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
from cnnforge.core.objectives import objective_direction
from cnnforge.core.rundir import RunDir
from cnnforge.modeling.hypermodel import may_pick_its_batch_size
from cnnforge.modeling.training import learning_rate_schedule
from cnnforge.tracking import Tracking
from cnnforge.tuning.auto import EPOCHS
from cnnforge.tuning.candidate import Budget, Target, measure_candidate
from cnnforge.tuning.oracles import ORACLES, stop_reason
from cnnforge.tuning.plan import SearchPlan
from cnnforge.tuning.records import SearchProgress, trial_record
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
        if time_budget is not None and plan is not None and plan.final_epoch_seconds:
            # the auto oracle leads with a trial whose final training fits (``AutoOracle``)
            self.oracle.final_fits = lambda cost: time_budget.final_fits(plan, pace(cost))
        self.move_deadline()
        self.trials_run: list[str] = []
        self.tracking = Tracking()
        self._measured: dict[str, dict[str, Any]] = {}  # Hyperband runs a candidate again
        self._told_to_stop: str | None = None
        self._ask_for_trial = self.oracle.create_trial
        # KerasTuner's search loop drops the STOPPED answer: keep its reason (a worker's oracle
        # is a gRPC client and has no other way to say why)
        self.oracle.create_trial = self._create_trial

    def _create_trial(self, tuner_id: str) -> Any:
        trial = self._ask_for_trial(tuner_id)
        self._told_to_stop = stop_reason(trial) or self._told_to_stop
        return trial

    def failure(self) -> str | None:
        """Why the search stopped before its end (trials that kept failing), as the oracle
        said, here or on the chief; None when it ran its course."""
        return getattr(self.oracle, "failure", None) or self._told_to_stop

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
            cost["cores_busy"] = cores_busy(cost)
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
        plan's final epochs, or the epochs the best trial took, at the best trial's pace."""
        if self.time_budget is None:
            return
        best = self.best_cost()
        if self.plan is not None and self.plan.final_epoch_seconds:
            # the plan's final epochs at the leader's pace: it trains them whole
            keep = self.time_budget.planned_final_seconds(self.plan, pace(best))
            self.oracle.deadline = self.time_budget.ends_at - self.time_budget.overhead - keep
            return
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


def cores_busy(cost: dict[str, Any]) -> float | None:
    """The cores the trainer kept busy over its steady steps: the process's CPU seconds (every
    thread's) over their wall seconds."""
    if not cost.get("steady_cpu_seconds") or not cost.get("steady_seconds"):
        return None
    return cost["steady_cpu_seconds"] / cost["steady_seconds"]


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
