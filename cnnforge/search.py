"""Tuner choice, run directory, resume → SearchResult.

A run directory belongs to one search configuration. Running the same configuration again
resumes it from KerasTuner's state in ``tuner/``; a different configuration is refused rather
than mixed. Each trial's cost (parameters, epochs, seconds) is kept beside KerasTuner's own trial
state, so ``trials.csv`` can be rewritten from disk after every trial and after a resume.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import keras
import keras_tuner
import numpy as np

from cnnforge import __version__
from cnnforge.artifacts import atomic_write_text, save_model_atomic
from cnnforge.data import Dataset, DataSpec, load_dataset
from cnnforge.errors import CnnforgeError
from cnnforge.hypermodel import PluginHyperModel, default_space, resolve_plugin

TUNERS = {
    "random": keras_tuner.RandomSearch,
    "bayesian": keras_tuner.BayesianOptimization,
    "hyperband": keras_tuner.Hyperband,
    "grid": keras_tuner.GridSearch,
}  # random and bayesian run with a baseline-first oracle (below)
# Settings that define a search; a run directory is resumed only with the same ones.
IDENTITY_KEYS = ("data", "arch", "backbone", "weights", "tuner", "objective", "seed", "fix", "space",
                 "val_fraction")  # fmt: skip


@dataclass
class SearchConfig:
    """Everything that defines a search. ``fix`` pins hyperparameters; ``space`` narrows them.

    The model is an architecture (``arch``, simple_cnn unless a backbone is given) or a backbone
    (``backbone``: a registered one or ``run:PATH``) with ``weights``: imagenet (the default),
    none, or a weights file.
    """

    data: str = "fashion_mnist_small"
    arch: str | None = None
    backbone: str | None = None
    weights: str | None = None
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

    def __post_init__(self) -> None:
        if self.arch is None and self.backbone is None:
            self.arch = "simple_cnn"

    @property
    def model_name(self) -> str:
        """The architecture or backbone searched."""
        return self.backbone or self.arch or "simple_cnn"

    def validate(self) -> None:
        if self.arch and self.backbone:
            raise CnnforgeError(
                f"give an architecture ({self.arch}) or a backbone ({self.backbone}), not both"
            )
        if self.weights is not None and not self.backbone:
            raise CnnforgeError("weights apply to a backbone; give one or drop the weights")
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
            raise CnnforgeError(f"{config.model_name!r} has no hyperparameter {name!r}; {hint}")
    hps = keras_tuner.HyperParameters()
    for name, text in config.fix.items():
        hps.Fixed(name, _typed(by_name[name], text))
    for name, texts in config.space.items():
        values = [_typed(by_name[name], t) for t in texts]
        hps.Choice(name, values, default=values[0])
    return hps


def _trial_cost_path(tuner: keras_tuner.Tuner, trial_id: str) -> Path:
    return Path(tuner.get_trial_dir(trial_id)) / "cnnforge_cost.json"


def _make_tuner_class(base: type) -> type:
    """``base`` plus what cnnforge records per trial, and progress events."""

    class RecordingTuner(base):
        def __init__(self, *args: Any, progress: SearchProgress | None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.progress = progress
            self.trials_started = 0

        def run_trial(self, trial, *args, **kwargs):
            self.trials_started += 1
            if self.progress:
                total = getattr(self.oracle, "max_trials", None)
                self.progress.trial_started(
                    self.trials_started, total, trial.hyperparameters.values
                )
            start = time.perf_counter()
            try:
                return super().run_trial(trial, *args, **kwargs)
            finally:
                cost = {**self.hypermodel.last_fit, "duration_s": time.perf_counter() - start}
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
                message=(trial.message or "").strip().splitlines()[-1] if trial.message else "",
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


BASELINE_FIRST_ORACLES = {
    "random": type(
        "RandomSearchOracle", (_BaselineFirst, keras_tuner.oracles.RandomSearchOracle), {}
    ),
    "bayesian": type(
        "BayesianOptimizationOracle",
        (_BaselineFirst, keras_tuner.oracles.BayesianOptimizationOracle),
        {},
    ),
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
    if config.tuner in BASELINE_FIRST_ORACLES:
        oracle = BASELINE_FIRST_ORACLES[config.tuner](max_trials=config.max_trials, **search_space)
        return _make_tuner_class(keras_tuner.Tuner)(oracle=oracle, **storage)
    tuner_class = _make_tuner_class(TUNERS[config.tuner])
    if config.tuner == "hyperband":
        return tuner_class(max_epochs=config.epochs, **search_space, **storage)
    return tuner_class(max_trials=config.max_trials, **search_space, **storage)


def search(
    config: SearchConfig,
    *,
    dataset: Dataset | None = None,
    progress: SearchProgress | None = None,
) -> SearchResult:
    """Run (or resume) the search ``config`` describes; write the run directory; return the best."""
    config.validate()
    plugin = resolve_plugin(config)
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
    callbacks = _epoch_callback(progress, config.epochs)
    if config.patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                config.objective,
                patience=config.patience,
                mode=objective_direction(config.objective),
            )
        )
    try:
        tuner.search(
            dataset.x_train.astype("float32"),
            dataset.y_train,
            validation_data=(dataset.x_val.astype("float32"), dataset.y_val),
            epochs=config.epochs,
            batch_size=config.batch_size,
            callbacks=callbacks,
            verbose=0,
        )
    except RuntimeError as exc:  # KerasTuner gives up after too many failed trials
        raise CnnforgeError(f"search stopped: {str(exc).strip().splitlines()[-1]}") from exc
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
