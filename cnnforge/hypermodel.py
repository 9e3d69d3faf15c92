"""Plugin + DataSpec → a KerasTuner HyperModel.

cnnforge owns both ends of every model so that every export has the same contract: the input
``images`` takes raw pixels (float32, NHWC, 0–255) and scales them inside the model; the output
``probabilities`` is a softmax over the classes. An architecture plugin builds what lies between:
``build(hp, inputs, spec) -> features``, a 2-D tensor (batch, features). A backbone plugin gets
the transfer treatment of ``transfer.py`` in between instead: resize, frozen pretrained features,
a searched head, and a second training stage that fine-tunes its top layers.

Every hyperparameter has a default, so ``build(HyperParameters())`` is the baseline model and the
search space can be read by building once (``default_space``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import keras
import keras_tuner

from cnnforge import registry, transfer
from cnnforge.data import DataSpec
from cnnforge.errors import CnnforgeError
from cnnforge.registry import Plugin

if TYPE_CHECKING:
    from cnnforge.search import SearchConfig

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


def resolve_plugin(config: SearchConfig) -> Plugin:
    """The plugin a search builds: an architecture, or a backbone with its weights checked."""
    if not config.backbone:
        return registry.get("architecture", config.arch or "simple_cnn")
    sizes = [config.fix.get("image_size"), *config.space.get("image_size", [])]
    pinned = tuple(int(s) for s in sizes if s is not None and str(s).strip().isdigit())
    return transfer.resolve_backbone(config.backbone, config.weights, pinned)


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
    inputs = keras.Input(spec.input_shape, name=INPUT_NAME, dtype="float32")
    if plugin.kind == "backbone":
        features = transfer.backbone_features(plugin, hp, inputs, spec)
    else:
        features = _architecture_features(plugin, hp, inputs, spec)
    outputs = keras.layers.Dense(spec.num_classes, activation="softmax", name=OUTPUT_NAME)(features)
    model = keras.Model(inputs, outputs, name=transfer.model_name(plugin))
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
    """The plugin's search space, read from its own ``hp`` calls by building the default model.

    A backbone is built without pretrained weights here: the space does not depend on them.
    """
    hp = keras_tuner.HyperParameters()
    if plugin.kind == "backbone" and "weights" in plugin.info:
        plugin = dataclasses.replace(plugin, info={**plugin.info, "weights": None})
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
        if self.plugin.kind == "backbone":
            history = transfer.fine_tune(hp, model, history, *args, **kwargs)
        self.last_fit = {
            "params": model.count_params(),
            "epochs": len(history.history.get("loss", [])),
            "train_seconds": time.perf_counter() - start,
            # KerasTuner keeps only each metric's best epoch; the report plots every epoch.
            "history": {k: [float(v) for v in values] for k, values in history.history.items()},
        }
        return history
