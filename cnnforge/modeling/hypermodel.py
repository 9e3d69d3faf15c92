"""Plugin + DataSpec → a KerasTuner HyperModel.

cnnforge owns both ends of every model so that every export has the same contract: the input
``images`` takes raw pixels (float32, NHWC, 0–255) and scales them inside the model; the output
``probabilities`` is a softmax over the classes. An architecture plugin builds what lies between:
``build(hp, inputs, spec) -> features``, a 2-D tensor (batch, features). A whole-model plugin
(``build(hp)`` / ``build(hp, spec) -> keras.Model``, or a KerasTuner HyperModel) is wrapped in
the same contract by ``whole.py`` and trains with its own compile (and its own ``fit``) where it
has one. A backbone plugin gets
the transfer treatment of ``transfer.py`` in between instead: resize, frozen pretrained features,
a searched head, and a second training stage that fine-tunes its top layers.

Every hyperparameter has a default, so ``build(HyperParameters())`` is the baseline model and the
search space can be read by building once (``default_space``).
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from typing import Any

import keras
import keras_tuner
import numpy as np

from cnnforge.core.contract import INPUT_NAME, OUTPUT_NAME
from cnnforge.core.errors import CnnforgeError
from cnnforge.data.dataset import DataSpec
from cnnforge.data.stream import MEMORY_ENV
from cnnforge.modeling import training, transfer, whole
from cnnforge.registry import FEATURES, Plugin


def _architecture_features(plugin: Plugin, hp: Any, inputs: Any, spec: DataSpec) -> Any:
    scaled = keras.layers.Rescaling(1.0 / 255, name="pixel_scaling")(inputs)
    try:
        features = plugin.fn(hp, scaled, spec)
    except CnnforgeError:
        raise
    except Exception as exc:
        raise CnnforgeError(
            f"architecture plugin {plugin.name!r} (from {plugin.source}) failed to build: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(features, keras.KerasTensor) or len(features.shape) != 2:
        shape = getattr(features, "shape", type(features).__name__)
        raise CnnforgeError(
            f"architecture plugin {plugin.name!r} returned {shape}; it must return a 2-D "
            "(batch, features) tensor: flatten or pool its last feature map"
        )
    return features


def build_model(plugin: Plugin, spec: DataSpec, hp: keras_tuner.HyperParameters) -> keras.Model:
    """The compiled classifier that ``plugin`` builds for ``spec`` with hyperparameters ``hp``.

    A backbone plugin is built with the weights bound by ``resolve_plugin`` (none if unbound).
    """
    if plugin.kind == "architecture" and plugin.info.get("form", FEATURES) != FEATURES:
        model, users = whole.whole_model(plugin, hp, spec)
        if uses_recipe(plugin, users):
            training.compile_model(model, training.recipe(hp))
        else:
            whole.compile_like(model, users)  # remembered: fit keeps this compile
        whole.forget_compile(users)
        return model
    inputs = keras.Input(spec.input_shape, name=INPUT_NAME, dtype="float32")
    if plugin.kind == "backbone":
        features = transfer.backbone_features(plugin, hp, inputs, spec)
    else:
        features = _architecture_features(plugin, hp, inputs, spec)
    # float32 even under mixed precision: the softmax and the exported output stay full precision
    outputs = keras.layers.Dense(
        spec.num_classes, activation="softmax", name=OUTPUT_NAME, dtype="float32"
    )(features)
    model = keras.Model(inputs, outputs, name=transfer.model_name(plugin))
    training.compile_model(model, training.recipe(hp))
    return model


def uses_recipe(plugin: Plugin, users_model: keras.Model | None = None) -> bool:
    """Whether a model of ``plugin`` trains with cnnforge's searched recipe: every features
    architecture and backbone does; a whole model does unless it comes compiled (and the
    plugin did not ask for the recipe with ``recipe=True``)."""
    if plugin.kind != "architecture" or plugin.info.get("form", FEATURES) == FEATURES:
        return True
    return bool(plugin.info.get("recipe")) or not whole.compiled_by_user(users_model)


# keras.Model.fit's batch size when none is given: what a plain Keras or KerasTuner script
# trains at, and so a model that brings its own compile (and the user's results with it).
KERAS_BATCH_SIZE = 32
CNNFORGE_TRAINING = "cnnforge's"


def own_batch_size(hp: keras_tuner.HyperParameters) -> int:
    """The batch size of a model trained with its own compile: the ``batch_size`` its
    hyperparameters name (``hp.Choice("batch_size", ...)``), else Keras's default."""
    value = hp.values.get("batch_size")
    return KERAS_BATCH_SIZE if value is None else int(value)


def training_of(plugin: Plugin, model: keras.Model, hp: keras_tuner.HyperParameters) -> str:
    """Which training a model of ``plugin`` (built, with ``hp``) gets, in words: its own fit,
    its own compile at its own batch size, or cnnforge's recipe."""
    if whole.overrides_fit(plugin):
        return "the model's own fit()"
    if whole.is_compiled_like_users(model):
        return f"the model's own (batch {own_batch_size(hp)})"
    return CNNFORGE_TRAINING


def may_pick_its_batch_size(plugin: Plugin) -> bool:
    """Whether a model of ``plugin`` may train at a batch size of its own (a whole model not
    registered with ``recipe=True``: its own fit, or its own compile), told before it is built."""
    if plugin.kind != "architecture" or plugin.info.get("form", FEATURES) == FEATURES:
        return False
    return not plugin.info.get("recipe") or whole.overrides_fit(plugin)


def plugin_priors(plugin: Plugin, spec: DataSpec) -> list[dict[str, Any]]:
    """The plugin's priors for ``spec`` (``priors=`` at registration), best first; none: []."""
    priors = plugin.info.get("priors") or []
    if callable(priors):
        try:
            priors = priors(spec)
        except Exception as exc:
            raise CnnforgeError(
                f"plugin {plugin.name!r} (from {plugin.source}): its priors function failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(priors, (list, tuple)) or not all(isinstance(p, dict) for p in priors):
        raise CnnforgeError(
            f"plugin {plugin.name!r} (from {plugin.source}): priors must be a list of "
            "{hyperparameter: value} dicts"
        )
    return [dict(p) for p in priors]


@dataclasses.dataclass(frozen=True)
class DefaultBuild:
    """What building a plugin's default model tells: its search space, and which training it
    gets (``training_of``)."""

    space: list[keras_tuner.engine.hyperparameters.HyperParameter]
    training: str
    # the batch size it trains at when its own compile picks it (``own_batch_size``); None:
    # cnnforge's (or its own fit's, not known before it runs)
    batch_size: int | None = None


def default_build(plugin: Plugin, spec: DataSpec) -> DefaultBuild:
    """Build the plugin's default model once, to read its space from its own ``hp`` calls.

    A backbone is built without loading its weights here (no download); the space is still the
    one its weights give (``image_size`` starts at the native size only for pretrained ones).
    """
    hp = keras_tuner.HyperParameters()
    if plugin.kind == "backbone":
        plugin = dataclasses.replace(plugin, info={**plugin.info, transfer.SPACE_ONLY: True})
    model = build_model(plugin, spec, hp)
    training = training_of(plugin, model, hp)
    own = whole.is_compiled_like_users(model) and not whole.overrides_fit(plugin)
    keras.backend.clear_session()
    return DefaultBuild(list(hp.space), training, own_batch_size(hp) if own else None)


def default_space(
    plugin: Plugin, spec: DataSpec
) -> list[keras_tuner.engine.hyperparameters.HyperParameter]:
    """The plugin's search space, read from its own ``hp`` calls by building the default model."""
    return default_build(plugin, spec).space


def trial_seed(seed: int, hp: keras_tuner.HyperParameters) -> int:
    """The seed of one candidate: the search's seed and the candidate's own values, so a trial
    draws the same weights and batches whatever ran before it (resumed, or on another worker)."""
    values = json.dumps(hp.values, sort_keys=True, default=str)
    return zlib.crc32(f"{seed}:{values}".encode()) % 2**31


class TrainingClock(keras.callbacks.Callback):
    """Where training time goes, validation left out, so that retraining on more data can be
    costed: each epoch's start (up to its first batch: iterator, shuffle buffer, first step) and
    the steady steps after it, which scale with the number of examples, and the process's CPU
    seconds over those steps (how many cores the trainer kept busy)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = self.steady_seconds = self.steady_cpu_seconds = 0.0
        self.starts: list[float] = []
        self.epochs = self.steady_steps = 0

    def epoch_start(self) -> float:
        """An epoch's start once the step function is traced: the first epoch's start (which
        traces it, seconds on its own) counts only when it is the only one."""
        later = self.starts[1:] or self.starts
        return sum(later) / max(1, len(later))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._begin = self._first = self._last = time.perf_counter()
        self._first_cpu = self._last_cpu = time.process_time()
        self._steps = self._first_steps = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # Several steps run per call (steps_per_execution); ``batch`` is the call's last step
        # as if the call were full (the epoch's last one may not be): capped at the epoch's.
        self._last, self._last_cpu = time.perf_counter(), time.process_time()
        steps = min(batch + 1, self.params.get("steps") or batch + 1)
        if self._steps == 0:
            self._first, self._first_cpu, self._first_steps = self._last, self._last_cpu, steps
        self._steps = steps

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epochs += 1
        self.seconds += self._last - self._begin
        self.starts.append(self._first - self._begin)
        self.steady_seconds += self._last - self._first
        self.steady_cpu_seconds += self._last_cpu - self._first_cpu
        self.steady_steps += max(0, self._steps - self._first_steps)


class PluginHyperModel(keras_tuner.HyperModel):
    """The HyperModel a tuner searches: numpy arrays in, trained through cnnforge's tf.data
    pipeline with the trial's recipe (``training.py``); it remembers what the last ``fit`` cost."""

    def __init__(self, plugin: Plugin, spec: DataSpec, seed: int = 0) -> None:
        super().__init__(name=plugin.name, tunable=True)
        # a HyperModel class is made once: the instance that builds a trial's model fits it
        self.plugin = whole.with_hypermodel_instance(plugin)
        self.spec = spec
        self.seed = seed
        self.last_fit: dict[str, Any] = {}

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        keras.utils.set_random_seed(trial_seed(self.seed, hp))
        return build_model(self.plugin, self.spec, hp)

    def fit(
        self,
        hp: keras_tuner.HyperParameters,
        model: keras.Model,
        x: Any,
        y: Any,
        *,
        validation_data: tuple[Any, Any] | None = None,
        batch_size: int = KERAS_BATCH_SIZE,
        epochs: int = 1,
        initial_epoch: int = 0,
        **kwargs: Any,
    ):
        """Train ``model`` on ``x``, ``y`` (numpy: uint8 or float pixels, integer labels); a
        schedule spans the epochs of this call (a continued Hyperband trial restarts it). A
        whole model compiled by its plugin keeps its optimizer and trains at its own batch size
        (``own_batch_size``), not ``batch_size``; a HyperModel's own ``fit`` is called with
        float pixels and one-hot labels."""
        start = time.perf_counter()
        cnnforges = not whole.is_compiled_like_users(model)
        # the recipe's defaults (no augmentation) where the plugin brought its own training,
        # at the batch size its own script would train at
        recipe = training.recipe(hp if cnnforges else keras_tuner.HyperParameters())
        batch_size = batch_size if cnnforges else own_batch_size(hp)
        steps = training.steps_per_epoch(len(x), batch_size) * max(1, epochs - initial_epoch)
        if cnnforges:
            training.compile_model(model, recipe, steps=steps)
        clock = TrainingClock()
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), clock]
        own_fit = whole.overrides_fit(self.plugin)
        if own_fit:
            history = self._plugins_fit(
                hp, model, x, y, validation_data, epochs, initial_epoch, kwargs
            )
        else:
            train = training.training_data(
                x,
                y,
                recipe,
                num_classes=self.spec.num_classes,
                batch_size=batch_size,
                seed=trial_seed(self.seed, hp),
            )
            if validation_data is not None:
                kwargs["validation_data"] = training.evaluation_data(
                    *validation_data, num_classes=self.spec.num_classes, batch_size=batch_size
                )
            kwargs.update(epochs=epochs, initial_epoch=initial_epoch, shuffle=False)  # shuffled
            history = model.fit(train, **kwargs)
            if self.plugin.kind == "backbone":
                history = transfer.fine_tune(hp, model, history, train, **kwargs)
        self.last_fit = {
            "params": model.count_params(),
            "epochs": len(history.history.get("loss", [])),
            "initial_epoch": initial_epoch,
            "examples": len(x),
            "fit_seconds": time.perf_counter() - start,
            "train_seconds": clock.seconds,  # the training passes alone, not validation
            "epoch_start_seconds": clock.epoch_start(),
            "steady_seconds": clock.steady_seconds,
            "steady_cpu_seconds": clock.steady_cpu_seconds,
            # a plugin's own fit picks its own batch size: its pace is not known
            "steady_examples": None if own_fit else clock.steady_steps * batch_size,
            "batch_size": None if own_fit else batch_size,
            "training": training_of(self.plugin, model, hp),
            # KerasTuner keeps only each metric's best epoch; the report plots every epoch.
            "history": {k: [float(v) for v in values] for k, values in history.history.items()},
        }
        return history

    def _plugins_fit(
        self,
        hp: keras_tuner.HyperParameters,
        model: keras.Model,
        x: Any,
        y: Any,
        validation_data: tuple[Any, Any] | None,
        epochs: int,
        initial_epoch: int,
        kwargs: dict[str, Any],
    ) -> Any:
        """A HyperModel's own ``fit``, given what KerasTuner tutorials give it: float pixels
        (the model scales them) and one-hot labels; its History (or the model's last one).

        No ``batch_size`` is passed: a HyperModel's ``fit`` that sets its own (KerasTuner's
        tutorials tune it) would get it twice; one that does not trains with Keras's default."""
        classes = self.spec.num_classes
        if hasattr(x, "tf_dataset"):  # image files read from disk: cnnforge.data.stream
            raise CnnforgeError(
                f"architecture plugin {self.plugin.name!r} has its own fit(), which takes arrays "
                "in memory, but these images are streamed from disk (they exceed the memory "
                f"bound, {MEMORY_ENV}): raise {MEMORY_ENV}, pass a smaller --image-size, or drop "
                "the plugin's fit() to train through cnnforge"
            )
        if validation_data is not None:
            x_val, y_val = validation_data
            kwargs["validation_data"] = (
                np.asarray(x_val, "float32"),
                keras.utils.to_categorical(y_val, classes),
            )
        result = whole.hypermodel_of(self.plugin).fit(
            hp,
            model,
            np.asarray(x, "float32"),
            keras.utils.to_categorical(y, classes),
            epochs=epochs,
            initial_epoch=initial_epoch,
            **kwargs,
        )
        history = result if hasattr(result, "history") else getattr(model, "history", None)
        if history is None or not hasattr(history, "history"):
            raise CnnforgeError(
                f"architecture plugin {self.plugin.name!r}: its fit() must train the model it is "
                "given with model.fit(...) and return what that returns"
            )
        return history
