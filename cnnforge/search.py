"""Tuner choice, run directory, resume, distributed roles → SearchResult.

A run directory belongs to one search configuration. Running the same configuration again
resumes it from KerasTuner's state in ``tuner/``; a different configuration is refused rather
than mixed. A search runs in one process, or as a chief that serves the oracle over gRPC and
workers that run trials (KerasTuner's own engine, driven through its ``KERASTUNER_*`` variables).
The KerasTuner customisations (recording, oracles, atomic state) live in ``tuners.py``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import platform
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import keras_tuner
import numpy as np

from cnnforge import __version__, training
from cnnforge.artifacts import atomic_write_text, save_model_atomic
from cnnforge.candidate import LIMITS, Budget, Target
from cnnforge.data import Dataset, DataSpec, load_dataset, stratified_split
from cnnforge.errors import CnnforgeError
from cnnforge.hypermodel import PluginHyperModel, default_space, resolve_plugin
from cnnforge.objectives import objective_direction
from cnnforge.timebudget import TimeBudget, pace
from cnnforge.tuners import (
    OVER_BUDGET,
    TUNERS,
    NonFiniteLoss,
    RecordingTuner,
    SearchProgress,
    StopAtDeadline,
    TrialRecord,
    make_tuner,
    trial_record,
    trial_records,
    trials_csv_path,
    write_trials_csv,
)

# Settings that define a search; a run directory is resumed only with the same ones.
IDENTITY_KEYS = ("data", "arch", "backbone", "weights", "tuner", "objective", "seed", "fix", "space",
                 "val_fraction", "search_fraction")  # fmt: skip
IDENTITY_KEYS += tuple(LIMITS.values())  # a budget decides which trials train


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
    # Distributed search: "chief" (serves the oracle at ``address``) or "worker" (runs trials
    # for the chief at ``address``, as ``worker_id``); a silent worker loses its trial after
    # ``worker_timeout`` seconds.
    distributed: str | None = None
    address: str | None = None
    worker_id: str | None = None
    worker_timeout: float = 300.0
    # "mirrored": each trial trains on all local GPUs with tf.distribute.MirroredStrategy.
    strategy: str | None = None
    # Each candidate is timed with onnxruntime on this provider at this batch size before it is
    # trained; one over a budget below (None: no limit) is recorded but not trained.
    latency_provider: str = "cpu"
    latency_batch_size: int = 1
    max_latency_ms: float | None = None
    max_params: int | None = None
    max_flops: int | None = None
    max_size_mb: float | None = None
    # Seconds the search may take, final training included (None: no limit): no trial starts,
    # and a running one stops, once the time left is what the final training needs.
    time_budget: float | None = None
    # Train the best trial's model again on train+validation, for the epochs it took to its best
    # (fewer if the time budget has no room for them); off: keep the trial's own model.
    retrain: bool = True
    # The share of the training examples (stratified) each trial trains on.
    search_fraction: float = 1.0
    # Same seed, same numbers: TensorFlow's deterministic ops (slower for some ops).
    deterministic: bool = False
    # "auto" trains in mixed float16 on a GPU and float32 on a CPU; or "float32" or "mixed".
    precision: str = "auto"

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
        if self.distributed:
            _validate_distributed(self)
        if self.strategy not in (None, "mirrored"):
            raise CnnforgeError(f"--strategy takes mirrored, got {self.strategy!r}")
        if not 0 < self.search_fraction <= 1:
            raise CnnforgeError(f"search-fraction must be in (0, 1], got {self.search_fraction}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise CnnforgeError(f"time budget must be positive, got {self.time_budget} s")
        if self.precision not in training.PRECISIONS:
            raise CnnforgeError(
                f"precision takes {', '.join(training.PRECISIONS)}, got {self.precision!r}"
            )
        self._validate_budget()

    def _validate_budget(self) -> None:
        from cnnforge.runtime import provider_name

        provider_name(self.latency_provider)
        if self.latency_batch_size < 1:
            raise CnnforgeError(
                f"latency-batch-size must be at least 1, got {self.latency_batch_size}"
            )
        for name in LIMITS.values():
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise CnnforgeError(f"{name.replace('_', '-')} must be positive, got {value}")

    def budget(self) -> Budget:
        return Budget(**{name: getattr(self, name) for name in LIMITS.values()})

    def target(self) -> Target:
        return Target(self.latency_provider, self.latency_batch_size)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "run_dir": str(self.run_dir)}


@dataclass
class FinalTraining:
    """How the best trial's model was trained again on train+validation."""

    examples: int
    epochs: int
    epochs_found: int  # what the search found; more than ``epochs`` when the budget cut it
    seconds: float


@dataclass
class SearchResult:
    run_dir: Path
    best_model: Path
    best_trial: TrialRecord
    trials: list[TrialRecord]
    spec: DataSpec
    objective: str
    final_training: FinalTraining | None = None


def _validate_distributed(config: SearchConfig) -> None:
    if config.distributed not in ("chief", "worker"):
        raise CnnforgeError(f"--distributed takes chief or worker, got {config.distributed!r}")
    flag = "--listen" if config.distributed == "chief" else "--chief"
    host, _, port = (config.address or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CnnforgeError(
            f"a {config.distributed} needs {flag} HOST:PORT, got {config.address!r}"
        )
    if config.distributed == "worker" and (not config.worker_id or "chief" in config.worker_id):
        raise CnnforgeError("a worker needs --worker-id ID, unique per worker and without 'chief'")
    if config.worker_timeout <= 0:
        raise CnnforgeError(f"worker timeout must be positive seconds, got {config.worker_timeout}")


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


KERASTUNER_VARIABLES = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")


@contextlib.contextmanager
def _kerastuner_role(config: SearchConfig) -> Iterator[None]:
    """Set KerasTuner's distributed-search variables for this process while the search runs."""
    if not config.distributed:
        yield
        return
    host, _, port = config.address.rpartition(":")  # type: ignore[union-attr]
    tuner_id = "chief" if config.distributed == "chief" else config.worker_id
    saved = {name: os.environ.get(name) for name in KERASTUNER_VARIABLES}
    os.environ.update(
        KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=port
    )
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _search_context(config: SearchConfig) -> Iterator[None]:
    """What a search process sets while it runs: its KerasTuner role, the training precision,
    deterministic ops if asked for."""
    with (
        _kerastuner_role(config),
        training.precision_policy(config.precision),
        training.op_determinism(config.deterministic),
    ):
        yield


def _epoch_callback(
    progress: SearchProgress | None, epochs: Callable[[], int]
) -> list[keras.callbacks.Callback]:
    """Report each epoch's end to ``progress``, out of ``epochs()`` (a plan may change)."""
    if progress is None:
        return []
    return [
        keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: progress.epoch_ended(epoch + 1, epochs(), logs or {})
        )
    ]


def _dataset(config: SearchConfig, dataset: Dataset | None) -> Dataset:
    """``dataset``, or the one ``config`` names, split as the search splits it."""
    return dataset or load_dataset(config.data, val_fraction=config.val_fraction, seed=config.seed)


def _prepare(
    config: SearchConfig,
    dataset: Dataset | None,
    progress: SearchProgress | None,
    time_budget: TimeBudget | None = None,
):
    """Check everything, write config.json, build the tuner: what chief, worker and a local
    search share."""
    plugin = resolve_plugin(config)
    dataset = _dataset(config, dataset)
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
    tuner = make_tuner(
        config.tuner,
        objective=config.objective,
        max_trials=config.max_trials,
        epochs=config.epochs,
        seed=config.seed,
        hyperparameters=hps,
        lease_seconds=config.worker_timeout if config.distributed == "chief" else None,
        budget=config.budget(),
        target=config.target(),
        time_budget=time_budget,
        hypermodel=PluginHyperModel(plugin, dataset.spec, seed=config.seed),
        directory=str(config.run_dir),
        project_name="tuner",
        overwrite=False,
        progress=progress,
        distribution_strategy=_strategy(config.strategy),
    )
    return dataset, tuner


def _strategy(name: str | None) -> Any:
    import tensorflow as tf

    return tf.distribute.MirroredStrategy() if name == "mirrored" else None


def trial_training_data(dataset: Dataset, config: SearchConfig) -> tuple[np.ndarray, np.ndarray]:
    """What each trial trains on: the training split, or its stratified ``search_fraction``."""
    if config.search_fraction >= 1:
        return dataset.x_train, dataset.y_train
    _, subset = stratified_split(dataset.y_train, config.search_fraction, config.seed)
    return dataset.x_train[subset], dataset.y_train[subset]


def _run_trials(config: SearchConfig, tuner: RecordingTuner, dataset: Dataset, progress) -> None:
    callbacks = [*_epoch_callback(progress, lambda: config.epochs), NonFiniteLoss()]
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
                *trial_training_data(dataset, config),
                validation_data=(dataset.x_val, dataset.y_val),
                epochs=config.epochs,
                batch_size=config.batch_size,
                callbacks=callbacks,
                verbose=0,
            )
    except RuntimeError as exc:  # KerasTuner gives up after too many failed trials in a row
        if "consecutive failures" not in str(exc):
            raise
        records = trial_records(tuner.oracle)
        write_trials_csv(records, config.run_dir / "trials.csv")
        failed = [r for r in records if r.status == "FAILED"]
        raise CnnforgeError(
            f"search stopped: {len(failed)} trial(s) failed, the last "
            f"{tuner.oracle.max_consecutive_failed_trials} in a row (last: {failed[-1].message}); "
            f"see {config.run_dir / 'trials.csv'}"
        ) from exc


def _watch_as_chief(tuner: RecordingTuner, progress: SearchProgress | None) -> threading.Event:
    """While the chief serves: let silent workers go, and report trials as they end."""
    stop, oracle = threading.Event(), tuner.oracle
    reported = set(oracle.end_order)

    def watch() -> None:
        while not stop.wait(1.0):
            oracle.expire_silent_tuners()
            for trial_id in [t for t in oracle.end_order if t not in reported]:
                reported.add(trial_id)
                if progress:
                    trial_dir = Path(oracle._project_dir) / f"trial_{trial_id}"
                    progress.trial_ended(trial_record(oracle.trials[trial_id], trial_dir))

    threading.Thread(target=watch, name="cnnforge-chief-watch", daemon=True).start()
    return stop


def search(
    config: SearchConfig,
    *,
    dataset: Dataset | None = None,
    progress: SearchProgress | None = None,
    keep_after: float = 0.0,
) -> SearchResult:
    """Run (or resume) the search ``config`` describes, in this process or as the chief of a
    distributed search; write the run directory; return the best trial and model.

    With a time budget, the clock starts here; ``keep_after`` seconds of it are kept for what
    the caller does after the search (``cnnforge run``: export, benchmark, evaluation)."""
    if config.distributed == "worker":
        raise CnnforgeError("a worker runs trials for a chief: use cnnforge.search.work()")
    config.validate()
    started = time.time()
    with _search_context(config):
        dataset = _dataset(config, dataset)
        budget = _time_budget(config, dataset, started, keep_after)
        dataset, tuner = _prepare(config, dataset, progress, budget)
        stop = _watch_as_chief(tuner, progress) if config.distributed == "chief" else None
        try:
            _run_trials(config, tuner, dataset, progress)
        finally:
            if stop:
                stop.set()
        return _finish(config, tuner, dataset, progress)


def _time_budget(
    config: SearchConfig, dataset: Dataset, started: float, keep_after: float
) -> TimeBudget | None:
    if config.time_budget is None:
        return None
    final_examples = len(dataset.x_train) + len(dataset.x_val) if config.retrain else 0
    return TimeBudget(started + config.time_budget, config.time_budget, final_examples, keep_after)


def work(
    config: SearchConfig,
    *,
    dataset: Dataset | None = None,
    progress: SearchProgress | None = None,
) -> list[str]:
    """Run trials for the chief at ``config.address`` until it has none left; the trial ids run."""
    if config.distributed != "worker":
        raise CnnforgeError("work() is for a distributed worker: set distributed='worker'")
    config.validate()
    with _search_context(config):
        dataset, tuner = _prepare(config, dataset, progress)
        _run_trials(config, tuner, dataset, progress)
    return tuner.trials_run


def _best_model(tuner: RecordingTuner, best_trial: Any, record: TrialRecord, dataset: Dataset,
                config: SearchConfig) -> keras.Model:  # fmt: skip
    """The best trial's checkpoint, or, when it stayed with a worker that did not share the run
    directory, the same hyperparameters trained again for the epochs that trial ran."""
    if Path(tuner._get_checkpoint_fname(best_trial.trial_id)).exists():
        with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return tuner.load_model(best_trial)
    return _train_again(tuner.hypermodel, best_trial.hyperparameters, dataset, config,
                        epochs=record.epochs or config.epochs)  # fmt: skip


def _train_again(hypermodel: PluginHyperModel, hp: Any, dataset: Dataset, config: SearchConfig,
                 *, epochs: int) -> keras.Model:  # fmt: skip
    """A trial's model trained once more, as the trial trained it, when its checkpoint is not
    at hand."""
    keras.backend.clear_session()  # as KerasTuner does before a trial: the same layer names
    model = hypermodel.build(hp)
    x, y = trial_training_data(dataset, config)
    hypermodel.fit(hp, model, x, y, epochs=epochs, batch_size=config.batch_size, verbose=0)
    return model


def _final_training(
    tuner: RecordingTuner,
    best_trial: Any,
    record: TrialRecord,
    dataset: Dataset,
    config: SearchConfig,
    progress: SearchProgress | None,
) -> tuple[keras.Model, FinalTraining]:
    """The best trial's hyperparameters trained from scratch on train+validation, for the epochs
    the trial took to its best, or, under a time budget, as many as fit (planned again after
    every epoch, the schedule fitted to the plan)."""
    found = record.best_epoch or record.epochs or config.epochs
    x = np.concatenate([dataset.x_train, dataset.x_val])
    y = np.concatenate([dataset.y_train, dataset.y_val])
    budget = tuner.time_budget
    planned = budget.epochs_that_fit(pace(tuner.best_cost()), found) if budget else found
    callbacks: list[keras.callbacks.Callback] = [NonFiniteLoss()]
    plan = None
    if budget:
        deadline = budget.ends_at - budget.overhead
        plan = training.FitToDeadline(
            lambda: deadline, planned=planned, most=found,
            steps_per_epoch=training.steps_per_epoch(len(x), config.batch_size),
        )  # fmt: skip
        callbacks += [plan, StopAtDeadline(lambda: deadline)]
    if progress:
        progress.final_training_started(planned, found, len(x))
        callbacks += _epoch_callback(progress, lambda: plan.epochs if plan else found)
    start = time.perf_counter()
    strategy = tuner.distribution_strategy
    keras.backend.clear_session()  # as KerasTuner does before a trial: the same layer names
    with strategy.scope() if strategy else contextlib.nullcontext():  # on every GPU, like a trial
        model = tuner.hypermodel.build(best_trial.hyperparameters)
    history = tuner.hypermodel.fit(best_trial.hyperparameters, model, x, y, epochs=found,
                                   batch_size=config.batch_size, callbacks=callbacks, verbose=0)  # fmt: skip
    final = FinalTraining(len(x), len(history.history["loss"]), found, time.perf_counter() - start)
    if progress:
        progress.final_training_ended(final.epochs, final.seconds)
    return model, final


def _finish(
    config: SearchConfig, tuner: RecordingTuner, dataset: Dataset, progress: SearchProgress | None
) -> SearchResult:
    records = trial_records(tuner.oracle)
    write_trials_csv(records, trials_csv_path(tuner.oracle))
    completed = [r for r in records if r.score is not None and math.isfinite(r.score)]
    if not completed:
        refused = sum(r.status == OVER_BUDGET for r in records)
        why = f" ({refused} over budget: loosen the --max-* limits)" if refused else ""
        raise CnnforgeError(
            f"no trial completed in {config.run_dir}{why}; see the message column of trials.csv"
        )
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best = next(r for r in records if r.trial_id == best_trial.trial_id)
    final = None
    if config.retrain:
        best_model, final = _final_training(tuner, best_trial, best, dataset, config, progress)
    else:
        best_model = _best_model(tuner, best_trial, best, dataset, config)
    build = tuner.hypermodel.build
    best_model = training.as_float32(best_model, lambda: build(best_trial.hyperparameters))
    strategy = tuner.distribution_strategy
    with strategy.scope() if strategy else contextlib.nullcontext():
        best_model.optimizer.build(best_model.trainable_variables)  # saved whole, loads cleanly
    best_path = config.run_dir / "best.keras"
    save_model_atomic(best_model, best_path)
    summary = {**asdict(best), "final_training": asdict(final) if final else None}
    atomic_write_text(config.run_dir / "search.json", json.dumps(summary, indent=2))
    return SearchResult(
        config.run_dir, best_path, best, records, dataset.spec, config.objective, final
    )


def trial_model(run_dir: Path | str, trial_id: str, *, dataset: Dataset | None = None) -> Path:
    """Any trial of a run as ``trial-ID.keras`` in the run directory: its checkpoint loaded into
    the model its hyperparameters build or, without one (a trial refused for its budget, or run
    by a worker elsewhere), the model trained again for the run's epochs."""
    run_dir = Path(run_dir)
    trial_dir = run_dir / "tuner" / f"trial_{trial_id}"
    if not (trial_dir / "trial.json").is_file() or not (run_dir / "config.json").is_file():
        known = sorted(p.name.removeprefix("trial_") for p in (run_dir / "tuner").glob("trial_*"))
        raise CnnforgeError(
            f"{run_dir} has no trial {trial_id!r}; its trials: {', '.join(known) or 'none'}"
        )
    saved = json.loads((run_dir / "config.json").read_text())
    config = SearchConfig(**{**saved["search"], "run_dir": run_dir})
    spec = DataSpec(**{**saved["data_spec"], "input_shape": tuple(saved["data_spec"]["input_shape"]),
                       "class_names": tuple(saved["data_spec"]["class_names"])})  # fmt: skip
    trial = keras_tuner.engine.trial.Trial.load(str(trial_dir / "trial.json"))
    hypermodel = PluginHyperModel(resolve_plugin(config), spec, seed=config.seed)
    checkpoint = trial_dir / "checkpoint.weights.h5"
    if checkpoint.is_file():
        model = hypermodel.build(trial.hyperparameters)
        model.load_weights(str(checkpoint))
    else:
        dataset = _dataset(config, dataset)
        epochs = trial.hyperparameters.values.get("tuner/epochs", config.epochs)
        model = _train_again(hypermodel, trial.hyperparameters, dataset, config, epochs=epochs)
    model.optimizer.build(model.trainable_variables)  # saved whole, loads cleanly
    path = run_dir / f"trial-{trial_id}.keras"
    save_model_atomic(model, path)
    return path
