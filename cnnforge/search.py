"""Tuner choice, run directory, resume → SearchResult.

A run directory belongs to one search configuration. Running the same configuration again
resumes it from KerasTuner's state in ``tuner/``; a different configuration is refused rather
than mixed. Each trial's cost (parameters, epochs, seconds) is kept beside KerasTuner's own trial
state, so ``trials.csv`` can be rewritten from disk after every trial and after a resume.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import math
import platform
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import keras
import keras_tuner
import numpy as np

from cnnforge import __version__, registry
from cnnforge.artifacts import atomic_write_text, save_model_atomic
from cnnforge.data import Dataset, DataSpec, load_dataset
from cnnforge.errors import CnnforgeError
from cnnforge.hypermodel import PluginHyperModel, default_space


def _save_json_atomically(path: str, obj: Any) -> str:
    """KerasTuner's ``utils.save_json``, but written to a temporary name and renamed."""
    text = json.dumps(obj)
    atomic_write_text(Path(path), text)
    return text


# KerasTuner writes its oracle, tuner and trial state in place: a job killed mid-write would
# leave a truncated JSON file that cannot be resumed. Every KerasTuner module calls
# ``utils.save_json`` through the module, so replacing it there makes all those writes atomic.
keras_tuner.src.utils.save_json = _save_json_atomically

TUNERS = ("random", "bayesian", "hyperband", "grid")
# Settings that define a search; a run directory is resumed only with the same ones.
IDENTITY_KEYS = ("data", "arch", "tuner", "objective", "seed", "fix", "space", "val_fraction")


@dataclass
class SearchConfig:
    """Everything that defines a search. ``fix`` pins hyperparameters; ``space`` narrows them."""

    data: str = "fashion_mnist_small"
    arch: str = "simple_cnn"
    run_dir: Path = Path("runs/latest")
    tuner: str = "random"
    max_trials: int = 10
    epochs: int = 10
    batch_size: int = 32
    objective: str = "val_accuracy"
    seed: int = 0
    patience: int = 3
    val_fraction: float = 0.1
    fix: dict[str, str] = field(default_factory=dict)
    space: dict[str, list[str]] = field(default_factory=dict)

    def validate(self) -> None:
        if self.tuner not in TUNERS:
            raise CnnforgeError(f"unknown tuner {self.tuner!r}; choose one of {', '.join(TUNERS)}")
        for name in ("max_trials", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise CnnforgeError(
                    f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.patience < 0:
            raise CnnforgeError(f"patience must be 0 (off) or more, got {self.patience}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "run_dir": str(self.run_dir)}


@dataclass
class TrialRecord:
    """One row of trials.csv."""

    trial_id: str
    status: str
    score: float | None
    metrics: dict[str, float]
    hyperparameters: dict[str, Any]
    params: int | None = None
    epochs: int | None = None
    duration_s: float | None = None
    message: str = ""


@dataclass
class SearchResult:
    run_dir: Path
    best_model: Path
    best_trial: TrialRecord
    trials: list[TrialRecord]
    spec: DataSpec
    objective: str


class SearchProgress(Protocol):
    """What a front end hears while a search runs."""

    def trial_started(
        self, number: int, total: int | None, hyperparameters: dict[str, Any]
    ) -> None: ...
    def epoch_ended(self, epoch: int, epochs: int, logs: dict[str, float]) -> None: ...
    def trial_ended(self, record: TrialRecord) -> None: ...


def objective_direction(objective: str) -> str:
    return "min" if "loss" in objective else "max"


def library_versions() -> dict[str, str]:
    import tensorflow as tf

    return {
        "cnnforge": __version__,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_tuner": keras_tuner.__version__,
        "numpy": np.__version__,
    }


def _typed(hp: Any, text: str) -> Any:
    """Parse ``text`` as a value of the hyperparameter ``hp``."""
    example = hp.default if hp.default is not None else getattr(hp, "values", [text])[0]
    try:
        if isinstance(example, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return type(example)(text)
    except ValueError:
        raise CnnforgeError(
            f"hyperparameter {hp.name!r} takes {type(example).__name__} values, got {text!r}"
        ) from None


def constrained_hyperparameters(config: SearchConfig, space: list) -> keras_tuner.HyperParameters:
    """KerasTuner HyperParameters with ``--fix`` and ``--space`` applied, names checked."""
    by_name = {hp.name: hp for hp in space}
    for name in [*config.fix, *config.space]:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            hint = (
                f"did you mean {', '.join(close)}?"
                if close
                else f"choose from {', '.join(by_name)}"
            )
            raise CnnforgeError(f"{config.arch!r} has no hyperparameter {name!r}; {hint}")
    hps = keras_tuner.HyperParameters()
    for name, text in config.fix.items():
        hps.Fixed(name, _typed(by_name[name], text))
    for name, texts in config.space.items():
        values = [_typed(by_name[name], t) for t in texts]
        hps.Choice(name, values, default=values[0])
    return hps


def _trial_cost_path(tuner: keras_tuner.Tuner, trial_id: str) -> Path:
    return Path(tuner.get_trial_dir(trial_id)) / "cnnforge_cost.json"


class NonFiniteLoss(keras.callbacks.Callback):
    """Fail the trial as soon as the loss is NaN or infinite, saying at which epoch."""

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss} at epoch {epoch + 1}; lower the learning rate"
            )


def _failure_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _make_tuner_class(base: type) -> type:
    """``base`` plus what cnnforge records per trial, failures as reasons, and progress events."""

    class RecordingTuner(base):
        def __init__(self, *args: Any, progress: SearchProgress | None, **kwargs: Any) -> None:
            with contextlib.redirect_stdout(io.StringIO()):  # KerasTuner prints "Reloading Tuner"
                super().__init__(*args, **kwargs)
            self.progress = progress

        def run_trial(self, trial, *args, **kwargs):
            if self.progress:
                total = getattr(self.oracle, "max_trials", None)
                number = int(trial.trial_id) + 1
                self.progress.trial_started(number, total, trial.hyperparameters.values)
            start = time.perf_counter()
            cost: dict[str, Any] = {}
            try:
                return super().run_trial(trial, *args, **kwargs)
            except Exception as exc:
                # Any failure of one trial (a plugin that raises, out of memory, NaN loss) is
                # recorded with its reason; KerasTuner counts FAILED trials in a row.
                cost["error"] = _failure_reason(exc)
                raise keras_tuner.errors.FailedTrialError(cost["error"]) from exc
            finally:
                cost.update(self.hypermodel.last_fit, duration_s=time.perf_counter() - start)
                atomic_write_text(_trial_cost_path(self, trial.trial_id), json.dumps(cost))
                self.hypermodel.last_fit = {}

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            records = trial_records(self)
            write_trials_csv(records, Path(self.project_dir).parent / "trials.csv")
            if self.progress:
                self.progress.trial_ended(next(r for r in records if r.trial_id == trial.trial_id))

    RecordingTuner.__name__ = f"Recording{base.__name__}"
    return RecordingTuner


def trial_records(tuner: keras_tuner.Tuner) -> list[TrialRecord]:
    """Every trial the oracle knows, with cnnforge's cost records where they exist."""
    records = []
    for trial in sorted(tuner.oracle.trials.values(), key=lambda t: t.trial_id):
        cost_file = _trial_cost_path(tuner, trial.trial_id)
        cost = json.loads(cost_file.read_text()) if cost_file.exists() else {}
        metrics = {
            name: float(trial.metrics.get_best_value(name))
            for name in trial.metrics.metrics
            if trial.metrics.get_best_value(name) is not None
        }
        records.append(
            TrialRecord(
                trial_id=trial.trial_id,
                status=str(trial.status),
                score=None if trial.score is None else float(trial.score),
                metrics=metrics,
                hyperparameters=dict(trial.hyperparameters.values),
                params=cost.get("params"),
                epochs=cost.get("epochs"),
                duration_s=cost.get("duration_s"),
                message=cost.get("error", ""),
            )
        )
    return records


def write_trials_csv(records: list[TrialRecord], path: Path) -> None:
    metric_names = sorted({m for r in records for m in r.metrics})
    hp_names = list(dict.fromkeys(h for r in records for h in r.hyperparameters))
    header = ["trial_id", "status", "score", *metric_names, "params", "epochs", "duration_s"]
    header += [f"hp_{h}" for h in hp_names] + ["message"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for r in records:
        writer.writerow(
            [r.trial_id, r.status, r.score, *(r.metrics.get(m) for m in metric_names)]
            + [r.params, r.epochs, None if r.duration_s is None else round(r.duration_s, 3)]
            + [r.hyperparameters.get(h) for h in hp_names]
            + [r.message]
        )
    atomic_write_text(path, out.getvalue())


def _check_run_dir(config: SearchConfig) -> None:
    """Refuse to mix two different searches in one run directory."""
    config_file = config.run_dir / "config.json"
    if not config_file.exists():
        return
    previous = json.loads(config_file.read_text()).get("search", {})
    differs = [k for k in IDENTITY_KEYS if previous.get(k) != config.to_json().get(k)]
    if differs:
        raise CnnforgeError(
            f"run directory {config.run_dir} holds a different search (differs in "
            f"{', '.join(differs)}); pass another --run-dir, or delete it to start fresh"
        )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a search like Ctrl-C: KerasTuner's state is saved, the trial re-runs later."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _epoch_callback(progress: SearchProgress | None, epochs: int) -> list[keras.callbacks.Callback]:
    if progress is None:
        return []
    return [
        keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: progress.epoch_ended(epoch + 1, epochs, logs or {})
        )
    ]


class _BaselineFirst:
    """Oracle mixin: the first trial is the default build, so a search never ends below baseline."""

    def populate_space(self, trial_id):
        if not self.trials:
            defaults = {hp.name: hp.default for hp in self.hyperparameters.space}
            return {"status": keras_tuner.engine.trial.TrialStatus.RUNNING, "values": defaults}
        return super().populate_space(trial_id)


class _ResumableGridOracle(keras_tuner.oracles.GridSearchOracle):
    """KerasTuner's grid oracle keeps its walk through the grid (the order of tried trials and
    the queue of trials to expand) outside its saved state, so a reloaded grid search fails with
    a KeyError. This one saves both and rebuilds them on reload."""

    def get_state(self) -> dict[str, Any]:
        order, index, ids = [], self._ordered_ids._next_index[None], self._ordered_ids
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


ORACLES = {
    "random": type(
        "RandomSearchOracle", (_BaselineFirst, keras_tuner.oracles.RandomSearchOracle), {}
    ),
    "bayesian": type(
        "BayesianOptimizationOracle",
        (_BaselineFirst, keras_tuner.oracles.BayesianOptimizationOracle),
        {},
    ),
    "grid": _ResumableGridOracle,  # starts from the defaults by itself
}


def _build_tuner(config: SearchConfig, hypermodel, hps, progress) -> keras_tuner.Tuner:
    objective = keras_tuner.Objective(config.objective, objective_direction(config.objective))
    search_space = dict(
        objective=objective, hyperparameters=hps, tune_new_entries=True, seed=config.seed
    )
    storage = dict(
        hypermodel=hypermodel,
        directory=str(config.run_dir),
        project_name="tuner",
        overwrite=False,
        progress=progress,
    )
    if config.tuner == "hyperband":  # Hyperband's tuner sets each trial's epochs itself
        tuner_class = _make_tuner_class(keras_tuner.Hyperband)
        return tuner_class(max_epochs=config.epochs, **search_space, **storage)
    oracle = ORACLES[config.tuner](max_trials=config.max_trials, **search_space)
    return _make_tuner_class(keras_tuner.Tuner)(oracle=oracle, **storage)


def search(
    config: SearchConfig,
    *,
    dataset: Dataset | None = None,
    progress: SearchProgress | None = None,
) -> SearchResult:
    """Run (or resume) the search ``config`` describes; write the run directory; return the best."""
    config.validate()
    plugin = registry.get("architecture", config.arch)
    dataset = dataset or load_dataset(
        config.data, val_fraction=config.val_fraction, seed=config.seed
    )
    _check_run_dir(config)
    keras.utils.set_random_seed(config.seed)
    hps = constrained_hyperparameters(config, default_space(plugin, dataset.spec))
    atomic_write_text(
        config.run_dir / "config.json",
        json.dumps(
            {
                "search": config.to_json(),
                "data_spec": asdict(dataset.spec),
                "versions": library_versions(),
            },
            indent=2,
        ),
    )
    hypermodel = PluginHyperModel(plugin, dataset.spec)
    tuner = _build_tuner(config, hypermodel, hps, progress)
    callbacks = [*_epoch_callback(progress, config.epochs), NonFiniteLoss()]
    if config.patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                config.objective,
                patience=config.patience,
                mode=objective_direction(config.objective),
            )
        )
    try:
        with _sigterm_as_interrupt():
            tuner.search(
                dataset.x_train.astype("float32"),
                dataset.y_train,
                validation_data=(dataset.x_val.astype("float32"), dataset.y_val),
                epochs=config.epochs,
                batch_size=config.batch_size,
                callbacks=callbacks,
                verbose=0,
            )
    except RuntimeError as exc:  # KerasTuner gives up after too many failed trials in a row
        if "consecutive failures" not in str(exc):
            raise
        records = trial_records(tuner)
        write_trials_csv(records, config.run_dir / "trials.csv")
        failed = [r for r in records if r.status == "FAILED"]
        raise CnnforgeError(
            f"search stopped: {len(failed)} trial(s) failed, the last "
            f"{tuner.oracle.max_consecutive_failed_trials} in a row (last: {failed[-1].message}); "
            f"see {config.run_dir / 'trials.csv'}"
        ) from exc
    return _finish(config, tuner, dataset.spec)


def _finish(config: SearchConfig, tuner: keras_tuner.Tuner, spec: DataSpec) -> SearchResult:
    records = trial_records(tuner)
    write_trials_csv(records, config.run_dir / "trials.csv")
    completed = [r for r in records if r.score is not None and math.isfinite(r.score)]
    if not completed:
        raise CnnforgeError(
            f"no trial completed in {config.run_dir}; see the message column of trials.csv"
        )
    best_trial = tuner.oracle.get_best_trials(1)[0]
    with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        best_model = tuner.load_model(best_trial)
    best_model.optimizer.build(best_model.trainable_variables)  # saved whole, loads cleanly
    best_path = config.run_dir / "best.keras"
    save_model_atomic(best_model, best_path)
    best = next(r for r in records if r.trial_id == best_trial.trial_id)
    atomic_write_text(config.run_dir / "search.json", json.dumps(asdict(best), indent=2))
    return SearchResult(config.run_dir, best_path, best, records, spec, config.objective)
