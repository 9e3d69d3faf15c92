"""The training recipe and input pipeline: real tf.data batches, real schedules, real models."""

from __future__ import annotations

import os
import time
from typing import Any

import keras
import keras_tuner
import numpy as np
import pytest

import cnnforge
from cnnforge.data.dataset import DataSpec
from cnnforge.modeling import training
from cnnforge.modeling.hypermodel import PluginHyperModel, build_model
from cnnforge.modeling.training import Recipe
from cnnforge.tuning.tuners import cores_busy

GRAY_28 = DataSpec("test", (28, 28, 1), tuple("abcdefghij"))


def _dot_images(count: int, row: int = 14, column: int = 10) -> np.ndarray:
    """Black images with one white pixel, so where it went shows what a transform did."""
    images = np.zeros((count, 28, 28, 1), dtype=np.uint8)
    images[:, row, column, 0] = 255
    return images


def _one_epoch(recipe: Recipe, images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    data = training.training_data(
        images, np.arange(len(images)) % 10, recipe, num_classes=10, batch_size=8, seed=seed
    )
    batches = list(data.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_without_augmentation_the_pipeline_casts_shuffles_and_one_hots():
    images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1) * np.ones((1, 4, 4, 1), np.uint8)
    x, y = _one_epoch(Recipe(), images)
    assert x.dtype == np.float32 and y.shape == (20, 10)
    assert sorted(x[:, 0, 0, 0].tolist()) == list(range(20))  # every image once
    assert x[:, 0, 0, 0].tolist() != list(range(20))  # shuffled
    assert np.array_equal(y.argmax(1), x[:, 0, 0, 0].astype(int) % 10)  # labels follow images


@pytest.mark.parametrize("augment, pad", [("subtle", 1), ("light", 2), ("medium", 3)])
def test_shifts_move_whole_images_by_whole_pixels_within_the_strength(augment, pad):
    """On 28x28: one pixel at most for ``subtle`` (1/28 of the side), two for ``light``."""
    x, _ = _one_epoch(Recipe(augment=augment), _dot_images(64))
    moved = 0
    for image in x[..., 0]:
        rows, columns = np.nonzero(image)
        assert len(rows) == 1 and image[rows[0], columns[0]] == 255  # moved, not blurred
        assert abs(rows[0] - 14) <= pad and abs(columns[0] - 10) <= pad
        moved += (rows[0], columns[0]) != (14, 10)
    assert moved > 32  # most images moved


def test_flips_mirror_about_half_the_images():
    x, _ = _one_epoch(Recipe(flip=True), _dot_images(200))
    columns = np.nonzero(x[..., 0])[2]
    assert set(columns.tolist()) == {10, 17}
    assert 60 < np.sum(columns == 17) < 140


def test_strong_augmentation_cuts_a_square_out_of_the_image():
    images = np.full((32, 28, 28, 1), 200, dtype=np.uint8)
    x, _ = _one_epoch(Recipe(augment="strong"), images)
    blanked = (x[..., 0] == 0).sum(axis=(1, 2))
    side = round(training.CUTOUT_FRACTION * 28)
    assert blanked.max() > side * side  # the cutout, plus the border a shift uncovers
    assert (blanked > 0).all()


def test_the_same_seed_gives_the_same_batches_and_each_epoch_new_draws():
    recipe = Recipe(augment="strong", flip=True)
    images = (np.random.default_rng(0).random((40, 28, 28, 1)) * 255).astype(np.uint8)
    first, _ = _one_epoch(recipe, images, seed=3)
    again, _ = _one_epoch(recipe, images, seed=3)
    other, _ = _one_epoch(recipe, images, seed=4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    data = training.training_data(
        images, np.zeros(40, int), recipe, num_classes=10, batch_size=40, seed=3
    )
    epoch_one, epoch_two = (next(iter(data))[0].numpy() for _ in range(2))
    assert not np.array_equal(epoch_one, epoch_two)


def test_augmentation_stays_out_of_the_model():
    hp = keras_tuner.HyperParameters()
    hp.Fixed("augment", "strong")
    hp.Fixed("flip", True)
    model = build_model(cnnforge.get("architecture", "simple_cnn"), GRAY_28, hp)
    random_layers = [
        layer.name for layer in model._flatten_layers() if type(layer).__name__.startswith("Random")
    ]
    assert random_layers == []
    images = (np.random.default_rng(1).random((4, 28, 28, 1)) * 255).astype("float32")
    assert np.array_equal(model(images, training=True), model(images, training=True))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    schedule = training.learning_rate(Recipe(learning_rate=0.01, lr_schedule="cosine"), 1000)
    warmup = int(1000 * training.WARMUP_FRACTION)
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(warmup)) == pytest.approx(0.01, rel=1e-3)
    assert float(schedule(warmup + 475)) == pytest.approx(0.005, rel=0.02)
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-7)
    assert training.learning_rate(Recipe(learning_rate=0.01), 1000) == 0.01


def test_recipe_reaches_the_optimizer_and_the_loss():
    model = build_model(
        cnnforge.get("architecture", "simple_cnn"), GRAY_28, keras_tuner.HyperParameters()
    )
    training.compile_model(model, Recipe(weight_decay=1e-4, label_smoothing=0.1), steps=10)
    assert isinstance(model.optimizer, keras.optimizers.AdamW)
    assert model.optimizer.weight_decay == pytest.approx(1e-4)
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.1)
    # Smoothing changes the loss of a confident right answer: no longer zero.
    confident = np.eye(10)[[0]].astype("float32")
    assert float(model.loss(confident, confident * 0.999 + 1e-4)) > 0.1


def test_a_trial_learns_through_the_pipeline_and_reports_its_pace(small_npz):
    dataset = cnnforge.load_dataset(str(small_npz))
    hypermodel = PluginHyperModel(cnnforge.get("architecture", "simple_cnn"), dataset.spec)
    hp = keras_tuner.HyperParameters()
    for name, value in [
        ("augment", "light"),
        ("flip", True),
        ("lr_schedule", "cosine"),
        ("label_smoothing", 0.1),
        ("learning_rate", 3e-3),
    ]:
        hp.Fixed(name, value)
    model = hypermodel.build(hp)
    history = hypermodel.fit(
        hp,
        model,
        dataset.x_train,
        dataset.y_train,
        epochs=4,
        batch_size=8,
        verbose=0,
        validation_data=(dataset.x_val, dataset.y_val),
    )
    assert history.history["val_accuracy"][-1] > 0.4  # 10 classes: chance is 0.1
    cost = hypermodel.last_fit
    assert cost["examples"] == len(dataset.x_train) and cost["epochs"] == 4
    assert 0 < cost["steady_seconds"] < cost["train_seconds"] < cost["fit_seconds"]
    # the trainer's threads' CPU time over the steady steps: some, and at most every core
    assert 0.05 < cores_busy(cost) <= (os.cpu_count() or 1) + 0.25
    # per epoch: the steps after the first call (each epoch's first call is its start)
    steps = -(-len(dataset.x_train) // 8)
    assert 4 * steps >= training.LOOPED_STEPS_MIN  # long enough to run looped steps
    assert model.steps_per_execution == training.STEPS_PER_EXECUTION < steps
    assert cost["steady_examples"] == 4 * (steps - training.STEPS_PER_EXECUTION) * 8


def test_a_short_training_runs_one_step_per_call_a_long_one_loops():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    training.compile_model(model, Recipe(), steps=training.LOOPED_STEPS_MIN - 1)
    assert model.steps_per_execution == 1  # tracing the loop would cost more than it saves
    training.compile_model(model, Recipe(), steps=training.LOOPED_STEPS_MIN)
    assert model.steps_per_execution == training.STEPS_PER_EXECUTION


def _fit_to_deadline(deadline: float, *, planned: int, most: int) -> tuple[keras.Model, Any]:
    """A small dense model trained with a cosine recipe for ``most`` epochs under a deadline."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((64, 8)).astype("float32")
    y = keras.utils.to_categorical(np.arange(64) % 2, 2)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
    steps = training.steps_per_epoch(len(x), 16)
    training.compile_model(
        model, Recipe(learning_rate=0.01, lr_schedule="cosine"), steps=steps * most
    )
    plan = training.FitToDeadline(
        lambda: deadline, planned=planned, most=most, steps_per_epoch=steps
    )
    model.fit(x, y, batch_size=16, epochs=most, callbacks=[plan], verbose=0)
    return model, plan


def _learning_rate_now(model: keras.Model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def test_a_final_training_with_room_runs_every_epoch_and_ends_its_schedule():
    model, plan = _fit_to_deadline(time.time() + 3600, planned=1, most=3)
    assert plan.epochs == 3 and int(model.optimizer.iterations.numpy()) == 3 * 4
    assert _learning_rate_now(model) == pytest.approx(0.0, abs=1e-9)


def test_a_deadline_shortens_the_run_and_its_schedule_still_reaches_zero(tmp_path):
    model, plan = _fit_to_deadline(time.time(), planned=3, most=3)
    assert plan.epochs == 1 and int(model.optimizer.iterations.numpy()) == 4
    assert _learning_rate_now(model) == pytest.approx(0.0, abs=1e-9)  # not cut mid-way
    model.save(tmp_path / "m.keras")  # the schedule is a plain Keras one again
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.optimizer.get_config()["learning_rate"]["config"]["decay_steps"] == 4 - 1


@pytest.mark.slow
def test_a_training_that_stops_before_its_data_ends_returns_at_once():
    """tf.data's autotuner could hold the release of a pipeline's iterator until its next
    wake-up, whose period doubles from 10 ms: fits of 200 steps of the 30-minute run's winner
    ended at exactly 40.96 s, 14-17 s after their last step, in two of three runs; three epochs
    took 63.8 s where 38.8 s without the tuner (Keras drops each epoch's iterator). Here: six
    fits of a real network on 28x28 images, each stopped after 48 steps of its data, each
    back within a second of its last step (with the tuner, some waited to 10.23 s)."""
    x = np.random.default_rng(0).integers(0, 256, (12800, 28, 28, 1), dtype=np.uint8)
    y = np.arange(len(x)) % 10
    recipe = Recipe(learning_rate=0.002, lr_schedule="cosine")
    model = build_model(cnnforge.registry.get("architecture", "simple_cnn"), GRAY_28, _wide())
    training.compile_model(model, recipe, steps=1000, steps_per_execution=1)

    class LastStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.at = time.perf_counter()

    waits = []
    for seed in range(6):
        data = training.training_data(x, y, recipe, num_classes=10, batch_size=128, seed=seed)
        last = LastStep()
        model.fit(data, epochs=1, steps_per_epoch=48, verbose=0, callbacks=[last])
        waits.append(time.perf_counter() - last.at)
    assert max(waits) < 1.0, [round(w, 2) for w in waits]


def _wide() -> keras_tuner.HyperParameters:
    """The auto search's wide prior: 64-128-128 filters, a 256-unit dense layer."""
    hp = keras_tuner.HyperParameters()
    for name, value in (("filters_0", 64), ("filters_1", 128), ("filters_2", 128)):
        hp.Fixed(name, value)
    hp.Fixed("dense_units_0", 256)
    return hp
