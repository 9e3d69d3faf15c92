"""Plugin + DataSpec → a KerasTuner HyperModel.

cnnforge owns both ends of every model so that every export has the same contract: the input
``images`` takes raw pixels (float32, NHWC, 0–255) and scales them inside the model; the output
``probabilities`` is a softmax over the classes. An architecture plugin builds what lies between:
``build(hp, inputs, spec) -> features``, a 2-D tensor (batch, features).

Every hyperparameter has a default, so ``build(HyperParameters())`` is the baseline model and the
search space can be read by building once (``default_space``).
"""

from __future__ import annotations

import time
from typing import Any

import keras
import keras_tuner

from cnnforge.data import DataSpec
from cnnforge.errors import CnnforgeError
from cnnforge.registry import Plugin

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


def model_inputs(spec: DataSpec) -> tuple[Any, Any]:
    """The raw-pixel input of every cnnforge model and the same pixels scaled to [0, 1]."""
    inputs = keras.Input(spec.input_shape, name=INPUT_NAME, dtype="float32")
    return inputs, keras.layers.Rescaling(1.0 / 255, name="pixel_scaling")(inputs)


def build_model(plugin: Plugin, spec: DataSpec, hp: keras_tuner.HyperParameters) -> keras.Model:
    """The compiled classifier that ``plugin`` builds for ``spec`` with hyperparameters ``hp``."""
    inputs, scaled = model_inputs(spec)
    features = plugin.fn(hp, scaled, spec)
    if not isinstance(features, keras.KerasTensor) or len(features.shape) != 2:
        shape = getattr(features, "shape", type(features).__name__)
        raise CnnforgeError(
            f"architecture plugin {plugin.name!r} returned {shape}; it must return a 2-D "
            "(batch, features) tensor: flatten or pool its last feature map"
        )
    outputs = keras.layers.Dense(spec.num_classes, activation="softmax", name=OUTPUT_NAME)(features)
    model = keras.Model(inputs, outputs, name=plugin.name)
    learning_rate = hp.Float("learning_rate", 1e-4, 1e-2, sampling="log", default=1e-3)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def default_space(
    plugin: Plugin, spec: DataSpec
) -> list[keras_tuner.engine.hyperparameters.HyperParameter]:
    """The plugin's search space, read from its own ``hp`` calls by building the default model."""
    hp = keras_tuner.HyperParameters()
    build_model(plugin, spec, hp)
    keras.backend.clear_session()
    return list(hp.space)


class PluginHyperModel(keras_tuner.HyperModel):
    """The HyperModel a tuner searches; it remembers what the last ``fit`` cost."""

    def __init__(self, plugin: Plugin, spec: DataSpec) -> None:
        super().__init__(name=plugin.name, tunable=True)
        self.plugin = plugin
        self.spec = spec
        self.last_fit: dict[str, Any] = {}

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        return build_model(self.plugin, self.spec, hp)

    def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model, *args: Any, **kwargs: Any):
        start = time.perf_counter()
        history = model.fit(*args, **kwargs)
        self.last_fit = {
            "params": model.count_params(),
            "epochs": len(history.history.get("loss", [])),
            "train_seconds": time.perf_counter() - start,
            # KerasTuner keeps only each metric's best epoch; the report plots every epoch.
            "history": {k: [float(v) for v in values] for k, values in history.history.items()},
        }
        return history
