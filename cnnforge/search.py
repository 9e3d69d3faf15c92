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
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import keras_tuner
import numpy as np

from cnnforge import __version__
from cnnforge.artifacts import atomic_write_text, save_model_atomic
from cnnforge.candidate import LIMITS, Budget, Target
from cnnforge.data import Dataset, DataSpec, load_dataset
from cnnforge.errors import CnnforgeError
from cnnforge.hypermodel import PluginHyperModel, default_space, resolve_plugin
from cnnforge.objectives import objective_direction
from cnnforge.tuners import (
    OVER_BUDGET,
    TUNERS,
    NonFiniteLoss,
    RecordingTuner,
    SearchProgress,
    TrialRecord,
    make_tuner,
    trial_record,
    trial_records,
    trials_csv_path,
    write_trials_csv,
)

# Settings that define a search; a run directory is resumed only with the same ones.
IDENTITY_KEYS = ("data", "arch", "backbone", "weights", "tuner", "objective", "seed", "fix", "space",
                 "val_fraction")  # fmt: skip
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
class SearchResult:
    run_dir: Path
    best_model: Path
    best_trial: TrialRecord
    trials: list[TrialRecord]
    spec: DataSpec
    objective: str


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


def _epoch_callback(progress: SearchProgress | None, epochs: int) -> list[keras.callbacks.Callback]:
    if progress is None:
        return []
    return [
        keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: progress.epoch_ended(epoch + 1, epochs, logs or {})
        )
    ]


def _prepare(config: SearchConfig, dataset: Dataset | None, progress: SearchProgress | None):
    """Check everything, write config.json, build the tuner: what chief, worker and a local
    search share."""
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
        hypermodel=PluginHyperModel(plugin, dataset.spec),
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


def _run_trials(config: SearchConfig, tuner: RecordingTuner, dataset: Dataset, progress) -> None:
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
) -> SearchResult:
    """Run (or resume) the search ``config`` describes, in this process or as the chief of a
    distributed search; write the run directory; return the best trial and model."""
    if config.distributed == "worker":
        raise CnnforgeError("a worker runs trials for a chief: use cnnforge.search.work()")
    config.validate()
    with _kerastuner_role(config):
        dataset, tuner = _prepare(config, dataset, progress)
        stop = _watch_as_chief(tuner, progress) if config.distributed == "chief" else None
        try:
            _run_trials(config, tuner, dataset, progress)
        finally:
            if stop:
                stop.set()
    return _finish(config, tuner, dataset)


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
    with _kerastuner_role(config):
        dataset, tuner = _prepare(config, dataset, progress)
        _run_trials(config, tuner, dataset, progress)
    return tuner.trials_run


def _best_model(
    tuner: RecordingTuner, best_trial: Any, record: TrialRecord, dataset: Dataset, config
):
    """The best trial's checkpoint, or, when it stayed with a worker that did not share the run
    directory, the same hyperparameters trained again for the epochs that trial ran."""
    if Path(tuner._get_checkpoint_fname(best_trial.trial_id)).exists():
        with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return tuner.load_model(best_trial)
    keras.utils.set_random_seed(config.seed)
    model = tuner.hypermodel.build(best_trial.hyperparameters)
    _train_again(model, dataset, config, epochs=record.epochs or config.epochs)
    return model


def _train_again(model: Any, dataset: Dataset, config: SearchConfig, *, epochs: int) -> None:
    """Train a trial's model once more when its checkpoint is not at hand."""
    model.fit(
        dataset.x_train.astype("float32"),
        dataset.y_train,
        validation_data=(dataset.x_val.astype("float32"), dataset.y_val),
        epochs=epochs,
        batch_size=config.batch_size,
        verbose=0,
    )


def _finish(config: SearchConfig, tuner: RecordingTuner, dataset: Dataset) -> SearchResult:
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
    best_model = _best_model(tuner, best_trial, best, dataset, config)
    strategy = tuner.distribution_strategy
    with strategy.scope() if strategy else contextlib.nullcontext():
        best_model.optimizer.build(best_model.trainable_variables)  # saved whole, loads cleanly
    best_path = config.run_dir / "best.keras"
    save_model_atomic(best_model, best_path)
    atomic_write_text(config.run_dir / "search.json", json.dumps(asdict(best), indent=2))
    return SearchResult(config.run_dir, best_path, best, records, dataset.spec, config.objective)


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
    hypermodel = PluginHyperModel(resolve_plugin(config), spec)
    keras.utils.set_random_seed(config.seed)
    model = hypermodel.build(trial.hyperparameters)
    checkpoint = trial_dir / "checkpoint.weights.h5"
    if checkpoint.is_file():
        model.load_weights(str(checkpoint))
    else:
        dataset = dataset or load_dataset(
            config.data, val_fraction=config.val_fraction, seed=config.seed
        )
        epochs = trial.hyperparameters.values.get("tuner/epochs", config.epochs)
        _train_again(model, dataset, config, epochs=epochs)
    model.optimizer.build(model.trainable_variables)  # saved whole, loads cleanly
    path = run_dir / f"trial-{trial_id}.keras"
    save_model_atomic(model, path)
    return path
