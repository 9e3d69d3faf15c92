"""Tuner choice, run directory, resume, distributed roles → SearchResult.

A run directory belongs to one search configuration. Running the same configuration again
resumes it from KerasTuner's state in ``tuner/``; a different configuration is refused rather
than mixed. A search runs in one process, or as a chief that serves the oracle over gRPC and
workers that run trials (KerasTuner's own engine, driven through its ``KERASTUNER_*`` variables).
The KerasTuner customisations live in ``tuners.py`` (recording, atomic state) and
``oracles.py``.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import keras_tuner
import numpy as np

from cnnforge import registry
from cnnforge.core.atomic import save_model_atomic
from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.core.objectives import objective_direction
from cnnforge.core.rundir import RunDir
from cnnforge.core.version import __version__
from cnnforge.data.dataset import Dataset, DataSpec, final_training_examples
from cnnforge.modeling import training, transfer
from cnnforge.modeling.hypermodel import (
    CNNFORGE_TRAINING,
    PluginHyperModel,
    default_build,
    plugin_priors,
)
from cnnforge.registry import Plugin
from cnnforge.tracking import Tracking, open_tracking, parse_track
from cnnforge.tuning.auto_plan import make_plan
from cnnforge.tuning.config import SearchConfig
from cnnforge.tuning.distributed import watch_as_chief
from cnnforge.tuning.final_training import (
    FinalTraining,
    class_weight,
    epoch_callback,
    final_training,
    save_validation_heldout,
    train_again,
    trial_checkpoint_or_retrained,
    trial_training_data,
)
from cnnforge.tuning.plan import SearchPlan, auto_batch_size
from cnnforge.tuning.process import search_context, sigterm_as_interrupt
from cnnforge.tuning.records import (
    OVER_BUDGET,
    SearchProgress,
    TrialRecord,
    trial_records,
    write_trials_csv,
)
from cnnforge.tuning.space import constrained_hyperparameters
from cnnforge.tuning.timebudget import TimeBudget
from cnnforge.tuning.tuners import (
    NonFiniteLoss,
    PatienceUnlessScheduled,
    RecordingTuner,
    make_tuner,
)


@dataclass
class SearchResult:
    run_dir: Path
    best_model: Path
    best_trial: TrialRecord
    trials: list[TrialRecord]
    spec: DataSpec
    objective: str
    final_training: FinalTraining | None = None
    # the trackers that logged the search to its end (not those that failed to start or stopped)
    tracked: tuple[str, ...] = ()


def resolve_plugin(config: SearchConfig) -> Plugin:
    """The plugin a search builds: an architecture, or a backbone with its weights checked."""
    if not config.backbone:
        return registry.get("architecture", config.arch or "simple_cnn")
    sizes = [config.fix.get("image_size"), *config.space.get("image_size", [])]
    pinned = tuple(int(s) for s in sizes if s is not None and str(s).strip().isdigit())
    return transfer.resolve_backbone(config.backbone, config.weights, pinned)


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


# how a refusal names the parts of a data fingerprint that differ
_FINGERPRINT_PARTS = {
    "class_names": "class names",
    "input_shape": "input shape",
    "splits": "split sizes",
    "content": "content",
}


def _check_run_dir(config: SearchConfig, dataset: Dataset) -> None:
    """Refuse to mix two different searches, or one search on two datasets, in one run
    directory."""
    run = RunDir(config.run_dir)
    if not run.is_run():
        return
    # read as a configuration: settings an older cnnforge did not record take their defaults
    previous = SearchConfig.from_json(run.read_config().get("search", {})).identity()
    differs = [k for k, v in config.identity().items() if previous.get(k) != v]
    data = _data_differs(run, dataset)
    if data:
        differs.append(f"data ({', '.join(data)})")
    if differs:
        raise CnnforgeError(
            f"run directory {config.run_dir} holds a different search (differs in "
            f"{', '.join(differs)}); pass another --run-dir, or delete it to start fresh"
        )


def _data_differs(run: RunDir, dataset: Dataset) -> list[str]:
    """The parts of the data's fingerprint that differ from the run's. A run directory of an
    older cnnforge recorded none: its data is taken to be the same (with a warning), and the
    search records the fingerprint for the next resume."""
    saved = (run.read_json(run.data) or {}).get("fingerprint")
    if saved is None:
        warnings.warn(
            f"run directory {run.path} records no fingerprint of its data (an older cnnforge): "
            "resuming on the data given, taken to be the same",
            CnnforgeWarning,
            stacklevel=2,
        )
        return []
    now = dataset.fingerprint()
    return [word for key, word in _FINGERPRINT_PARTS.items() if saved.get(key) != now[key]]


def _dataset(config: SearchConfig, dataset: Dataset | None) -> Dataset:
    """``dataset``, or the one ``config`` names, split as the search splits it."""
    return dataset or config.load_data()


def _prepare(
    config: SearchConfig,
    dataset: Dataset,
    progress: SearchProgress | None,
    *,
    started: float | None = None,
    keep_after: float = 0.0,
) -> RecordingTuner:
    """Check everything, plan an auto search, write config.json, data.json and plan.json (not a
    worker: it shares the chief's run directory and must not overwrite them), build the tuner:
    what chief, worker and a local search share."""
    plugin = resolve_plugin(config)
    keras.utils.set_random_seed(config.seed)
    built = default_build(plugin, dataset.spec)
    space = built.space
    if config.batch_size is not None and built.training != CNNFORGE_TRAINING:
        _warn_batch_size_unused(config.batch_size, plugin, built.training)
    # the batch size trials train at, planned and recorded: a model's own compile picks its own
    config.batch_size = (
        built.batch_size or config.batch_size or auto_batch_size(len(dataset.y_train))
    )
    _check_run_dir(config, dataset)
    _tell_image_size(config, plugin, dataset.spec, progress)
    hps = constrained_hyperparameters(config, space)
    hypermodel = PluginHyperModel(plugin, dataset.spec, seed=config.seed)
    run = RunDir(config.run_dir)
    priors = plugin_priors(plugin, dataset.spec)
    plan = None
    if config.tuner == "auto":
        full = keras_tuner.HyperParameters()
        full.merge(space)
        full.merge(hps.space)  # --fix and --space over the plugin's own
        plan = make_plan(config, dataset, hypermodel, full, priors, started, keep_after)
    time_budget = _time_budget(config, dataset, started, keep_after, plan)
    if config.distributed != "worker":  # a worker's settings are not the run's: the chief's are
        config.track = resolved_track(config)  # recorded in config.json: a resume keeps it
        run.write_config(config.to_json(), asdict(dataset.spec), library_versions())
        run.write_json(run.data, dataset.record())
        if plan is not None:
            run.write_json(run.plan, plan.to_json())
    return make_tuner(
        config.tuner,
        objective=config.objective,
        max_trials=config.trial_count,
        epochs=config.trial_epochs,
        seed=config.seed,
        hyperparameters=hps,
        lease_seconds=config.worker_timeout if config.distributed == "chief" else None,
        budget=config.budget(),
        target=config.target(),
        time_budget=time_budget,
        plan=plan,
        priors=priors,
        hypermodel=hypermodel,
        directory=str(run.path),
        project_name=run.tuner.name,
        overwrite=False,
        progress=progress,
        distribution_strategy=_strategy(config.strategy),
    )


def _warn_batch_size_unused(asked: int, plugin: Plugin, training: str) -> None:
    """--batch-size sets cnnforge's recipe; a model that trains with its own is not given it."""
    warnings.warn(
        f"--batch-size {asked} is for cnnforge's training recipe; {plugin.name!r} trains with "
        f"{training}: to set its batch size declare hp.Choice('batch_size', [...]) (or "
        "hp.Fixed) in its build, or register it with recipe=True for cnnforge's recipe",
        CnnforgeWarning,
        stacklevel=3,
    )


def _tell_image_size(
    config: SearchConfig, plugin: Plugin, spec: DataSpec, progress: SearchProgress | None
) -> None:
    """Say, in one line, that a backbone with random weights starts from the data's image size
    (unless the user chose the sizes)."""
    hear = getattr(progress, "note", None)
    chosen = "image_size" in config.fix or "image_size" in config.space
    if plugin.kind != "backbone" or chosen or hear is None:
        return
    note = transfer.image_size_note(plugin, spec)
    if note:
        hear(note)


def _strategy(name: str | None) -> Any:
    import tensorflow as tf

    return tf.distribute.MirroredStrategy() if name == "mirrored" else None


def _run_trials(config: SearchConfig, tuner: RecordingTuner, dataset: Dataset, progress) -> None:
    callbacks = [*epoch_callback(progress, lambda: tuner.trial_epochs), NonFiniteLoss()]
    if config.patience:
        callbacks.append(
            PatienceUnlessScheduled(
                config.objective,
                patience=config.patience,
                mode=objective_direction(config.objective),
            )
        )
    with sigterm_as_interrupt():
        tuner.search(
            *trial_training_data(dataset, config, tuner.plan),
            validation_data=(dataset.x_val, dataset.y_val),
            epochs=config.trial_epochs,
            batch_size=config.batch_size,
            callbacks=callbacks,
            verbose=0,
            **class_weight(config, dataset),
        )
    failure = tuner.failure()
    if failure is None:
        return
    if config.distributed == "worker":
        raise CnnforgeError(f"search stopped: {failure}; see the chief's trials.csv")
    # the oracle wrote trials.csv as the last trial ended
    raise CnnforgeError(f"search stopped: {failure}; see {RunDir(config.run_dir).trials}")


def search(
    config: SearchConfig,
    *,
    dataset: Dataset | None = None,
    progress: SearchProgress | None = None,
    keep_after: float = 0.0,
    started: float | None = None,
    debug: bool | None = None,
) -> SearchResult:
    """Run (or resume) the search ``config`` describes, in this process or as the chief of a
    distributed search; write the run directory; return the best trial and model.

    ``dataset``: the data ``config.data`` names, when the caller has loaded it already (split
    with the config's ``val_fraction`` and ``seed``). With a time budget, the clock starts at
    ``started`` (a ``time.time()``; default: now), and ``keep_after`` seconds of it are kept for
    what the caller does after the search (``cnnforge run``: export, benchmark, evaluation)."""
    if config.distributed == "worker":
        raise CnnforgeError("a worker runs trials for a chief: use cnnforge.tuning.search.work()")
    config.validate()
    started = time.time() if started is None else started
    with search_context(config, debug):
        dataset = _dataset(config, dataset)
        tuner = _prepare(config, dataset, progress, started=started, keep_after=keep_after)
        _announce_plan(config, tuner, progress)
        tuner.tracking = _start_tracking(config, tuner)
        with contextlib.closing(tuner.tracking):
            stop_watching = watch_as_chief(tuner) if config.distributed == "chief" else None
            try:
                _run_trials(config, tuner, dataset, progress)
            finally:
                if stop_watching:
                    stop_watching()
            return _finish(config, tuner, dataset, progress)


def _announce_plan(
    config: SearchConfig, tuner: RecordingTuner, progress: SearchProgress | None
) -> None:
    """Tell a front end that can hear it what the search will run, and until when."""
    hear = getattr(progress, "search_planned", None)
    if hear is None:
        return
    ends_at = tuner.time_budget.ends_at if tuner.time_budget else None
    if tuner.plan is not None:
        hear(tuner.plan.summary(), ends_at)
    elif ends_at is not None:
        hear(f"{config.tuner} search until the time budget's deadline", ends_at)


def resolved_track(config: SearchConfig) -> list[str]:
    """The trackers of a search: ``config.track``, or, when it is None, those the run directory
    recorded (a resumed search keeps its tracking), else the default (TensorBoard)."""
    if config.track is not None:
        return list(parse_track(config.track))
    run = RunDir(config.run_dir)
    saved = run.read_config().get("search", {}).get("track") if run.is_run() else None
    return list(parse_track(saved))


def _start_tracking(config: SearchConfig, tuner: RecordingTuner) -> Tracking:
    tracking = open_tracking(config.run_dir, config.track or [], model_name=config.model_name)
    space = [hp.name for hp in tuner.oracle.hyperparameters.space]
    tracking.search_started(config.to_json(), space)
    return tracking


def _time_budget(
    config: SearchConfig,
    dataset: Dataset,
    started: float | None,
    keep_after: float,
    plan: SearchPlan | None,
) -> TimeBudget | None:
    """The deadline the trials and the final training keep to: none without a budget; none
    for a distributed worker (the chief keeps the clock and answers its trials STOPPED); none
    for a --deterministic auto search (its plan, made from FLOPs, runs whole: a clock would
    make the trials depend on the machine's load)."""
    seconds = config.effective_time_budget()
    if seconds is None or config.distributed == "worker":
        return None
    if plan is not None and config.deterministic:
        return None
    final_examples = final_training_examples(dataset, config.seed) if config.retrain else 0
    start = time.time() if started is None else started
    return TimeBudget(start + seconds, seconds, final_examples, keep_after)


def work(
    config: SearchConfig,
    *,
    dataset: Dataset | None = None,
    progress: SearchProgress | None = None,
    debug: bool | None = None,
) -> list[str]:
    """Run trials for the chief at ``config.address`` until it has none left; the trial ids run."""
    if config.distributed != "worker":
        raise CnnforgeError("work() is for a distributed worker: set distributed='worker'")
    config.validate()
    with search_context(config, debug):
        dataset = _dataset(config, dataset)
        tuner = _prepare(config, dataset, progress)
        _run_trials(config, tuner, dataset, progress)
    return tuner.trials_run


def _finish(
    config: SearchConfig, tuner: RecordingTuner, dataset: Dataset, progress: SearchProgress | None
) -> SearchResult:
    run = tuner.run
    records = trial_records(tuner.oracle)
    write_trials_csv(records, run)
    completed = [r for r in records if r.score is not None and math.isfinite(r.score)]
    if not completed:
        refused = sum(r.status == OVER_BUDGET for r in records)
        why = f" ({refused} over budget: loosen the --max-* limits)" if refused else ""
        raise CnnforgeError(
            f"no trial completed in {config.run_dir}{why}; see the message column of trials.csv"
        )
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best = next(r for r in records if r.trial_id == best_trial.trial_id)
    tuner.tracking.search_ended(asdict(best))
    final = None
    if config.retrain:
        best_model, final = final_training(tuner, best_trial, best, dataset, config, progress)
    else:
        best_model = trial_checkpoint_or_retrained(tuner, best_trial, best, dataset, config)
        save_validation_heldout(run, dataset, best.trial_id)
    build = tuner.hypermodel.build
    best_model = training.as_float32(best_model, lambda: build(best_trial.hyperparameters))
    strategy = tuner.distribution_strategy
    with strategy.scope() if strategy else contextlib.nullcontext():
        best_model.optimizer.build(best_model.trainable_variables)  # saved whole, loads cleanly
    save_model_atomic(best_model, run.best_model)
    run.write_json(run.search, {**asdict(best), "final_training": asdict(final) if final else None})
    return SearchResult(
        config.run_dir,
        run.best_model,
        best,
        records,
        dataset.spec,
        config.objective,
        final,
        tracked=tuple(tuner.tracking.names),
    )


def trial_model(run_dir: Path | str, trial_id: str, *, dataset: Dataset | None = None) -> Path:
    """Any trial of a run as ``trial-ID.keras`` in the run directory: its checkpoint loaded into
    the model its hyperparameters build or, without one (a trial refused for its budget, or run
    by a worker elsewhere), the model trained again for the run's epochs."""
    run = RunDir(run_dir)
    trial_dir = run.trial_dir(trial_id)
    if not (trial_dir / "trial.json").is_file() or not run.is_run():
        raise CnnforgeError(
            f"{run.path} has no trial {trial_id!r}; its trials: "
            f"{', '.join(run.trial_ids()) or 'none'}"
        )
    saved = run.read_config()
    config = SearchConfig.from_json(saved["search"], run_dir=run.path)
    spec = DataSpec.from_json(saved["data_spec"])
    trial = keras_tuner.engine.trial.Trial.load(str(trial_dir / "trial.json"))
    hypermodel = PluginHyperModel(resolve_plugin(config), spec, seed=config.seed)
    checkpoint = trial_dir / "checkpoint.weights.h5"
    if checkpoint.is_file():
        model = hypermodel.build(trial.hyperparameters)
        model.load_weights(str(checkpoint))
    else:
        dataset = _dataset(config, dataset)
        epochs = trial.hyperparameters.values.get("tuner/epochs", config.trial_epochs)
        saved_plan = run.read_json(run.plan) if run.plan.is_file() else None
        plan = SearchPlan.from_json(saved_plan) if saved_plan else None
        model = train_again(
            hypermodel, trial.hyperparameters, dataset, config, epochs=epochs, plan=plan
        )
    model.optimizer.build(model.trainable_variables)  # saved whole, loads cleanly
    path = run.model_file(f"trial-{trial_id}.keras")
    save_model_atomic(model, path)
    return path
