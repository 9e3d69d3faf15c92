"""The winner's model: trained again from scratch on train+validation (under a time budget, as
many epochs as fit, planned again after every epoch), or, with ``--no-retrain``, the trial's own
checkpoint; and what each trial trains on."""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cnnforge.core.atomic import atomic_write_bytes
from cnnforge.core.rundir import RunDir
from cnnforge.data.dataset import Dataset, calibration_slice, stratified_split
from cnnforge.modeling import training
from cnnforge.modeling.hypermodel import PluginHyperModel
from cnnforge.tuning.config import SearchConfig
from cnnforge.tuning.plan import FINAL_EPOCHS_MAX, SearchPlan, auto_batch_size, final_epochs_cap
from cnnforge.tuning.records import SearchProgress, TrialRecord
from cnnforge.tuning.timebudget import pace
from cnnforge.tuning.tuners import (
    NonFiniteLoss,
    RecordingTuner,
    StopAtDeadline,
    cores_busy,
    training_gflops,
)

# The most a final training grows when the winner still improved. Not more: the 30-minute
# Fashion-MNIST run's winner (the first prior) reached 93.78 % with 36 final epochs (1.5x,
# ending 5 minutes inside its budget, bcb0951) and 93.49 % with 47 (up to 60, 7533cb4).
LONGER_WHEN_IMPROVING = 1.5
# A winner whose best epoch came after this share of its schedule is still improving: a cosine
# run's rate is under 15 % of its peak there, and a best at 6 of 7 epochs is a dip of the last
# one, not a peak passed.
IMPROVING_AFTER = 0.75


@dataclass
class FinalTraining:
    """How the best trial's model was trained again on train+validation."""

    examples: int
    epochs: int
    epochs_found: int  # what the search found; more than ``epochs`` when the budget cut it
    seconds: float
    calibration_images: int = 0  # of train+validation, held out (``calibration_slice``)
    train_gflops: float | None = None  # the trainer's pace over its steady steps (as a trial's)
    cores_busy: float | None = None  # CPU seconds over wall seconds of those steps


def epoch_callback(
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


def class_weight(config: SearchConfig, dataset: Dataset) -> dict[str, Any]:
    """``{"class_weight": …}`` for Keras' fit where ``--class-weight auto`` asks for it."""
    return {"class_weight": dataset.class_weights()} if config.class_weight == "auto" else {}


def trial_training_data(
    dataset: Dataset, config: SearchConfig, plan: SearchPlan | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """What each trial trains on: the training split, or a stratified share of it (the auto
    plan's search images, or ``search_fraction``)."""
    fraction = config.search_fraction
    if plan is not None:
        fraction = min(fraction, plan.search_examples / max(1, len(dataset.y_train)))
    if fraction >= 1:
        return dataset.x_train, dataset.y_train
    _, subset = stratified_split(dataset.y_train, fraction, config.seed)
    return dataset.x_train[subset], dataset.y_train[subset]


def trial_checkpoint(tuner: RecordingTuner, best_trial: Any) -> keras.Model | None:
    """The trial's model from its checkpoint, or None where the checkpoint is elsewhere."""
    if not Path(tuner._get_checkpoint_fname(best_trial.trial_id)).exists():
        return None
    with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        return tuner.load_model(best_trial)


def save_heldout(run: RunDir, indices: np.ndarray, labels: np.ndarray, source: str) -> None:
    """Which images of train+validation (``indices`` into their concatenation) the exported
    model did not train on (``RunDir.heldout``): export predicts them with the graph it writes
    and fits the temperature and the unknown threshold on them."""
    buffer = io.BytesIO()
    np.savez(buffer, indices=indices, labels=labels, source=np.array(source))
    atomic_write_bytes(run.heldout, buffer.getvalue())


def save_validation_heldout(run: RunDir, dataset: Dataset, trial_id: str) -> None:
    """Without a final training the exported model is the trial's, which never trained on the
    validation split: that split is its held-out data (nothing is saved without one)."""
    if len(dataset.y_val) == 0:
        return
    start = len(dataset.y_train)
    source = (
        f"validation split of {dataset.spec.name} ({len(dataset.y_val)} images), which "
        f"trial {trial_id}'s model did not train on"
    )
    save_heldout(run, np.arange(start, start + len(dataset.y_val)), dataset.y_val, source)


def trial_checkpoint_or_retrained(
    tuner: RecordingTuner,
    best_trial: Any,
    record: TrialRecord,
    dataset: Dataset,
    config: SearchConfig,
) -> keras.Model:
    """The best trial's checkpoint, or, when it stayed with a worker that did not share the run
    directory, the same hyperparameters trained again for the epochs that trial ran."""
    model = trial_checkpoint(tuner, best_trial)
    if model is not None:
        return model
    return train_again(
        tuner.hypermodel,
        best_trial.hyperparameters,
        dataset,
        config,
        epochs=record.epochs or config.trial_epochs,
        plan=tuner.plan,
    )


def train_again(
    hypermodel: PluginHyperModel,
    hp: Any,
    dataset: Dataset,
    config: SearchConfig,
    *,
    epochs: int,
    plan: SearchPlan | None = None,
) -> keras.Model:
    """A trial's model trained once more, as the trial trained it, when its checkpoint is not
    at hand."""
    keras.backend.clear_session()  # as KerasTuner does before a trial: the same layer names
    model = hypermodel.build(hp)
    x, y = trial_training_data(dataset, config, plan)
    hypermodel.fit(
        hp,
        model,
        x,
        y,
        epochs=epochs,
        batch_size=config.batch_size or auto_batch_size(len(dataset.y_train)),
        verbose=0,
        **class_weight(config, dataset),
    )
    return model


def _most_final_epochs(found: int, record: TrialRecord, examples: int, batch_size: int) -> int:
    """The most epochs an auto plan's final training under a budget may take where the search
    left time over: its cap of optimizer steps (``final_epochs_cap``; the plan may have given
    fewer, for want of time), or 1.5x the epochs found for a winner still improving, its best
    epoch in the last quarter of its schedule (``IMPROVING_AFTER``)."""
    most = max(found, final_epochs_cap(examples, record.batch_size or batch_size))
    if record.best_epoch and record.epochs and record.best_epoch > IMPROVING_AFTER * record.epochs:
        most = max(most, min(FINAL_EPOCHS_MAX, round(found * LONGER_WHEN_IMPROVING)))
    return most


def final_training(
    tuner: RecordingTuner,
    best_trial: Any,
    record: TrialRecord,
    dataset: Dataset,
    config: SearchConfig,
    progress: SearchProgress | None,
) -> tuple[keras.Model, FinalTraining]:
    """The best trial's hyperparameters trained from scratch on train+validation, for the epochs
    the auto plan gives it (else the epochs the trial took to its best), or, under a time
    budget, as many of them as fit (planned again after every epoch, the schedule fitted to
    the plan). A calibration slice (``calibration_slice``) is held out and saved as
    ``heldout.npz``."""
    found = tuner.final_epochs(
        {"best_epoch": record.best_epoch, "epochs": record.epochs or config.trial_epochs}
    )
    y = np.concatenate([dataset.y_train, dataset.y_val])
    kept, held = calibration_slice(y, config.seed)
    source = (
        f"{len(held)} images of train+validation of {dataset.spec.name} (stratified, seed "
        f"{config.seed}) held out of the final training"
    )
    save_heldout(tuner.run, held, y[held], source)
    x = np.concatenate([dataset.x_train, dataset.x_val])[kept]
    y = y[kept]
    budget = tuner.time_budget
    most = found
    if budget and tuner.plan is not None:  # an auto plan's final training: time left, used
        most = _most_final_epochs(found, record, len(x), config.batch_size)
    planned = budget.epochs_that_fit(pace(tuner.best_cost()), most) if budget else found
    callbacks: list[keras.callbacks.Callback] = [NonFiniteLoss()]
    plan = None
    if budget:
        deadline = budget.ends_at - budget.overhead
        plan = training.FitToDeadline(
            lambda: deadline,
            planned=planned,
            most=most,
            # the trial's batch size: a model trained with its own compile picks its own
            steps_per_epoch=training.steps_per_epoch(
                len(x), record.batch_size or config.batch_size
            ),
        )
        callbacks += [plan, StopAtDeadline(lambda: deadline)]
    if progress:
        progress.final_training_started(planned, found, len(x))
        callbacks += epoch_callback(progress, lambda: plan.epochs if plan else found)
    start = time.perf_counter()
    strategy = tuner.distribution_strategy
    keras.backend.clear_session()  # as KerasTuner does before a trial: the same layer names
    with strategy.scope() if strategy else contextlib.nullcontext():  # on every GPU, like a trial
        model = tuner.hypermodel.build(best_trial.hyperparameters)
    history = tuner.hypermodel.fit(
        best_trial.hyperparameters,
        model,
        x,
        y,
        epochs=most,
        batch_size=config.batch_size,
        callbacks=callbacks,
        verbose=0,
        **class_weight(config, dataset),
    )
    pace_of = {**tuner.hypermodel.last_fit, "flops": record.flops}
    final = FinalTraining(
        len(x),
        len(history.history["loss"]),
        found,
        time.perf_counter() - start,
        len(held),
        training_gflops(pace_of),
        cores_busy(pace_of),
    )
    if progress:
        progress.final_training_ended(final.epochs, final.seconds)
    return model, final
