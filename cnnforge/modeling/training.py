"""How a candidate is trained: the input pipeline and the training recipe.

cnnforge owns training the way it owns the model's two ends. The recipe's hyperparameters sit
in the same search space as the plugin's, each with a default that reproduces the seed's way of
training (Adam at 1e-3, constant, no label smoothing, no augmentation), so the default build is
still the baseline:

- ``learning_rate``, ``lr_schedule`` (constant, or cosine decay to zero after a linear warm-up
  over the first ~5% of steps), ``weight_decay`` (AdamW when above zero), ``label_smoothing``;
- ``augment`` (none, subtle, light, medium, strong: random shifts of up to 1/28, 1/14, 1/10,
  1/7 of the side, strong adding a cutout square) and ``flip`` (random horizontal flips).

Augmentation runs in the ``tf.data`` training pipeline only, batch at a time; the model, and so
the exported ONNX, never contains it. Every random draw of the pipeline comes from the seed it
is given (``tf.data.Dataset.random``), so the same seed gives the same batches.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from cnnforge.core.contract import TRAINING_PRECISIONS
from cnnforge.core.cpus import available_cpus
from cnnforge.modeling import batch_norm

SCHEDULES = ("constant", "cosine")
AUGMENT_SHIFT = {"none": 0.0, "subtle": 1 / 28, "light": 1 / 14, "medium": 1 / 10, "strong": 1 / 7}
CUTOUT_FRACTION = 0.25  # side of the square 'strong' blanks, as a fraction of the image side
WARMUP_FRACTION = 0.05
PRECISIONS = TRAINING_PRECISIONS
SAFETY = 1.05  # time estimates of a training run this much over its measured pace
# Training steps run in one call from Python: per-step dispatch cost a fifth of each epoch of
# the first simple_cnn prior on 2 cores (whole epochs: 3,100-3,550 images/s at 1, 4,000-4,350
# at 16). Batch callbacks hear every 16th step (their ``batch`` is the last step's index).
# Tracing the looped step costs about 0.6 s more per training run (small CNNs, 2 cores), what
# ~75 steps save: a run of fewer than LOOPED_STEPS_MIN steps runs one step per call.
STEPS_PER_EXECUTION, LOOPED_STEPS_MIN = 16, 100
# Batches made ready ahead of the training step (the pipelines run without tf.data's autotuner:
# ``without_autotuner``).
PREFETCH_BATCHES = 2


@dataclass(frozen=True)
class Recipe:
    """The training settings a trial's hyperparameters choose."""

    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    augment: str = "none"
    flip: bool = False

    @property
    def augments(self) -> bool:
        return self.augment != "none" or self.flip


def recipe(hp: Any) -> Recipe:
    """Declare the recipe's hyperparameters on ``hp`` (defaults: the seed's training)."""
    return Recipe(
        learning_rate=hp.Float("learning_rate", 1e-4, 1e-2, sampling="log", default=1e-3),
        lr_schedule=hp.Choice("lr_schedule", list(SCHEDULES), default="constant"),
        weight_decay=hp.Choice("weight_decay", [0.0, 1e-4, 5e-4], default=0.0),
        label_smoothing=hp.Choice("label_smoothing", [0.0, 0.05, 0.1], default=0.0),
        augment=hp.Choice("augment", list(AUGMENT_SHIFT), default="none"),
        flip=hp.Boolean("flip", default=False),
    )


def learning_rate(recipe: Recipe, steps: int) -> Any:
    """A float, or a warm-up-then-cosine schedule over ``steps`` optimizer steps."""
    if recipe.lr_schedule == "constant":
        return recipe.learning_rate
    warmup = max(1, int(steps * WARMUP_FRACTION)) if steps > 1 else 0
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else recipe.learning_rate,
        decay_steps=max(1, steps - warmup),
        warmup_target=recipe.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def learning_rate_schedule(optimizer: Any) -> Any:
    """The optimizer's schedule object (None for a constant rate), also under mixed precision,
    where a loss-scale optimizer wraps the one that holds it."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = getattr(inner, "_learning_rate", None)
    return rate if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule) else None


def compile_model(
    model: keras.Model,
    recipe: Recipe,
    *,
    steps: int = 1,
    steps_per_execution: int | None = None,
    fused_batch_norm: bool = True,
) -> None:
    """Compile for one-hot labels (what ``training_data`` yields), the optimizer set for
    ``steps`` steps of training, under the strategy the model was built in (a GPU mirror);
    ``steps_per_execution`` by default as the run's length pays for it; the model's
    ``BatchNormalization`` layers train through TensorFlow's fused kernel (``batch_norm``)
    unless ``fused_batch_norm`` is off."""
    if fused_batch_norm:
        batch_norm.fuse(model)
    if steps_per_execution is None:
        steps_per_execution = STEPS_PER_EXECUTION if steps >= LOOPED_STEPS_MIN else 1
    with model.distribute_strategy.scope():
        rate = learning_rate(recipe, steps)
        optimizer = (
            keras.optimizers.AdamW(rate, weight_decay=recipe.weight_decay)
            if recipe.weight_decay
            else keras.optimizers.Adam(rate)
        )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            steps_per_execution=steps_per_execution,
        )


class FitToDeadline(keras.callbacks.Callback):
    """Fit a training to a deadline without cutting its cosine schedule short.

    After each epoch the run is planned again at the pace measured so far (the first epoch,
    which traces the step function, counts only until a steady one is measured): as many epochs
    as still fit before ``deadline()``, at most ``most``, with the cosine re-aimed to reach zero
    at the last of them. A deadline that merely stopped training would leave the learning rate
    high, and an estimate made before training (from trials on fewer images) is seldom right
    to the epoch. The model must be compiled for ``most`` epochs and fit for ``most``;
    ``epochs`` is the plan, and after training the epochs run.
    """

    def __init__(
        self,
        deadline: Callable[[], float],
        *,
        planned: int,
        most: int,
        steps_per_epoch: int,
        margin: float = SAFETY,
    ) -> None:
        super().__init__()
        self.deadline = deadline
        self.epochs = planned
        self.most = most
        self.steps_per_epoch = steps_per_epoch
        self.margin = margin
        self._durations: list[float] = []
        self._schedule: Any = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._planning = not self._durations  # a second stage (fine-tuning) runs as compiled
        # Keras keeps the schedule object only on this attribute; its decay length becomes a
        # variable for the run (the compiled step reads it each time) and a number again after.
        schedule = learning_rate_schedule(self.model.optimizer)
        self._schedule = None
        if self._planning and isinstance(schedule, keras.optimizers.schedules.CosineDecay):
            self._schedule = schedule
            with self.model.distribute_strategy.scope():
                schedule.decay_steps = keras.Variable(
                    self._decay_steps(), dtype="float32", trainable=False, name="decay_steps"
                )

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._began = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._durations.append(time.perf_counter() - self._began)
        if not self._planning:
            return
        done = len(self._durations)
        steady = self._durations[1:] or self._durations
        per_epoch = sum(steady) / len(steady) * self.margin
        still_fit = math.floor((self.deadline() - time.time()) / per_epoch)
        self.epochs = max(done, min(self.most, done + still_fit))
        if self._schedule is not None:
            self._schedule.decay_steps.assign(self._decay_steps())
        if self.epochs <= done:
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        self.epochs = len(self._durations)
        if self._schedule is not None:
            self._schedule.decay_steps = int(self._schedule.decay_steps.numpy())

    def _decay_steps(self) -> float:
        warmup = self._schedule.warmup_steps if self._schedule.warmup_target is not None else 0
        return float(max(1, self.epochs * self.steps_per_epoch - warmup))


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return max(1, math.ceil(examples / batch_size))


def training_data(
    x: np.ndarray, y: np.ndarray, recipe: Recipe, *, num_classes: int, batch_size: int, seed: int
) -> Any:
    """Shuffled, augmented, one-hot batches, prefetched; reshuffled and redrawn every epoch."""
    import tensorflow as tf

    if hasattr(x, "tf_dataset"):  # image files read from disk: cnnforge.data.stream
        batches = x.tf_dataset(y, shuffle_seed=seed).batch(batch_size)
    else:
        images = tf.data.Dataset.from_tensor_slices((x, y))
        batches = images.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        batches = batches.batch(batch_size)
    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def prepare(batch: Any, draw: Any) -> Any:
        images, labels = batch
        images = tf.cast(images, tf.float32)
        if recipe.augments:
            images = augment_batch(images, recipe, tf.cast(draw, tf.int32))
        return images, tf.one_hot(labels, num_classes)

    pipeline = tf.data.Dataset.zip((batches, draws))
    prepared = pipeline.map(prepare, num_parallel_calls=available_cpus())
    return without_autotuner(prepared.prefetch(PREFETCH_BATCHES))


def evaluation_data(x: np.ndarray, y: np.ndarray, *, num_classes: int, batch_size: int) -> Any:
    """Validation batches: cast and one-hot once, then cached for every epoch (arrays; image
    files streamed from disk are read again each time)."""
    import tensorflow as tf

    streamed = hasattr(x, "tf_dataset")  # image files read from disk: not cached
    images = x.tf_dataset(y) if streamed else tf.data.Dataset.from_tensor_slices((x, y))
    images = images.batch(max(batch_size, 256))
    prepared = images.map(lambda i, label: (tf.cast(i, tf.float32), tf.one_hot(label, num_classes)))
    return without_autotuner(
        (prepared if streamed else prepared.cache()).prefetch(PREFETCH_BATCHES)
    )


def without_autotuner(dataset: Any) -> Any:
    """``dataset`` with tf.data's autotuner off. Its thread, whose wake-up period doubles from
    10 ms, could hold the release of an iterator until its next wake-up (TensorFlow 2.21, 2
    EPYC cores): fits of 200 steps ended at exactly 40.96 s, 14-17 s after their last step, in
    two of three runs, and three whole epochs took 63.8 s where 38.8 s without it (Keras
    drops each epoch's iterator). The pipelines are small (cast, one-hot, augmentation: a few
    percent of a step), so fixed parallelism (the CPUs this process may use) and a prefetch of
    ``PREFETCH_BATCHES`` keep the training step fed (in-memory steps as fast as with it)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def augment_batch(images: Any, recipe: Recipe, seed: Any) -> Any:
    """Flip, shift (zero fill, whole pixels) and cut out, per image, from one stateless seed."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 4)
    if recipe.flip:
        flipped = tf.random.stateless_uniform(tf.shape(images)[:1], seeds[0]) < 0.5
        images = tf.where(flipped[:, None, None, None], tf.reverse(images, axis=[2]), images)
    shift = AUGMENT_SHIFT[recipe.augment]
    if shift:
        images = _shift(images, shift, seeds[1], seeds[2])
    if recipe.augment == "strong":
        images = _cutout(images, CUTOUT_FRACTION, seeds[3])
    return images


def _shift(images: Any, fraction: float, row_seed: Any, column_seed: Any) -> Any:
    """Move each image by a whole number of pixels (up to ``fraction`` of its side) each way."""
    import tensorflow as tf

    height, width = images.shape[1], images.shape[2]
    pad = max(1, round(fraction * min(height, width)))
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    batch = tf.shape(images)[:1]
    rows = tf.random.stateless_uniform(batch, row_seed, 0, 2 * pad + 1, dtype=tf.int32)
    columns = tf.random.stateless_uniform(batch, column_seed, 0, 2 * pad + 1, dtype=tf.int32)
    padded = tf.gather(padded, rows[:, None] + tf.range(height)[None, :], axis=1, batch_dims=1)
    return tf.gather(padded, columns[:, None] + tf.range(width)[None, :], axis=2, batch_dims=1)


def _cutout(images: Any, fraction: float, seed: Any) -> Any:
    """Blank one square per image (side ``fraction`` of the image), centred anywhere on it."""
    import tensorflow as tf

    height, width = images.shape[1], images.shape[2]
    side = max(1, round(fraction * min(height, width)))
    where = tf.random.stateless_uniform(tf.stack([tf.shape(images)[0], 2]), seed)
    top = tf.cast(where[:, :1] * height, tf.int32) - side // 2
    left = tf.cast(where[:, 1:] * width, tf.int32) - side // 2
    inside_rows = (tf.range(height)[None, :] >= top) & (tf.range(height)[None, :] < top + side)
    inside_cols = (tf.range(width)[None, :] >= left) & (tf.range(width)[None, :] < left + side)
    blank = inside_rows[:, :, None] & inside_cols[:, None, :]
    return tf.where(blank[..., None], tf.zeros_like(images), images)


def resolved_precision(precision: str) -> str:
    """``auto`` is mixed precision where a GPU can use it, float32 elsewhere (on a CPU float16
    maths is emulated, slower than float32)."""
    if precision != "auto":
        return precision
    import tensorflow as tf

    return "mixed" if tf.config.list_physical_devices("GPU") else "float32"


@contextlib.contextmanager
def precision_policy(precision: str) -> Iterator[str]:
    """Build and train models under ``precision`` for the duration of the block."""
    policy = "mixed_float16" if resolved_precision(precision) == "mixed" else "float32"
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield policy
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def op_determinism(enabled: bool) -> Iterator[None]:
    """TensorFlow's deterministic ops for the duration of the block (TensorFlow's public API
    only switches them on; its config module switches them back)."""
    if not enabled:
        yield
        return
    from tensorflow.python.framework import config as tf_config

    already = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if not already:
            tf_config.disable_op_determinism()


def as_float32(model: keras.Model, build: Callable[[], keras.Model]) -> keras.Model:
    """``model`` as a float32 model (what is saved and exported): rebuilt by ``build`` under the
    float32 policy, the weights copied (mixed precision keeps its variables in float32)."""
    if model.dtype_policy.name == "float32":
        return model
    with precision_policy("float32"):
        full = build()
    full.set_weights(model.get_weights())
    return full
