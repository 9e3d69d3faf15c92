"""Whole-model architecture plugins → the cnnforge contract.

A Keras user's ``build_model(hp)`` (or ``build(hp, spec)``, or a ``keras_tuner.HyperModel``)
returns a whole classifier: its own input, its own softmax, often compiled. cnnforge wraps it
without touching its layers: an input ``images`` that takes raw pixels (float32, NHWC, 0–255),
the scaling to the pixel range the model expects, the model, and an output ``probabilities``.

How cnnforge knows the pixel range (it refuses to guess):
1. ``@cnnforge.architecture(NAME, pixel_range=(low, high))``: raw 0–255 pixels are mapped
   linearly onto ``low``–``high`` before the model (``(0, 1)`` for the KerasTuner tutorials);
2. otherwise, a model whose first layer is ``Rescaling`` or ``Normalization`` scales pixels
   itself, so it takes raw 0–255 pixels;
3. otherwise the plugin is refused with one line saying what to add.

A grayscale model written for ``(H, W)`` images (no channel axis, as MNIST tutorials do) gets
the data's ``(H, W, 1)`` images reshaped. The model must end in a softmax over the data's classes (a ``Dense(N, activation="softmax")``, a
``Softmax`` or a softmax ``Activation`` layer): a model that ends in logits is refused rather than
given a softmax, because its loss (``from_logits=True``) would then be wrong. An input shape that
is not the data's is refused too.

Training: a compiled model trains with its own optimizer (a fresh copy per trial) and loss, on
cnnforge's one-hot batches, so a sparse categorical cross-entropy becomes its categorical twin
(the same maths), at the batch size the user's own script would use
(``hypermodel.own_batch_size``). An uncompiled model, or one registered with ``recipe=True``, is
compiled with cnnforge's searched training recipe like any other architecture.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import keras

from cnnforge.core.contract import INPUT_NAME, OUTPUT_NAME
from cnnforge.core.errors import CnnforgeError
from cnnforge.data.dataset import DataSpec
from cnnforge.modeling.transfer import model_name
from cnnforge.registry import HYPERMODEL, Plugin

RAW_PIXELS = (0.0, 255.0)
SCALING_LAYERS = (keras.layers.Rescaling, keras.layers.Normalization)


def _where(plugin: Plugin) -> str:
    return f"architecture plugin {plugin.name!r} (from {plugin.source})"


def hypermodel_of(plugin: Plugin) -> Any:
    """The plugin's ``keras_tuner.HyperModel``: the registered instance, or one of its class."""
    return plugin.fn() if isinstance(plugin.fn, type) else plugin.fn


def with_hypermodel_instance(plugin: Plugin) -> Plugin:
    """``plugin`` with its HyperModel class made into one instance, so that the instance that
    builds a trial's model is the one that fits it (a ``fit`` may use what ``build`` set)."""
    if plugin.info.get("form") != HYPERMODEL or not isinstance(plugin.fn, type):
        return plugin
    try:
        instance = plugin.fn()
    except Exception as exc:
        raise CnnforgeError(
            f"{_where(plugin)}: {plugin.fn.__name__}() failed: {type(exc).__name__}: {exc}"
        ) from exc
    return dataclasses.replace(plugin, fn=instance)


def overrides_fit(plugin: Plugin) -> bool:
    """Whether the plugin is a HyperModel with a ``fit`` of its own."""
    import keras_tuner

    if plugin.info.get("form") != HYPERMODEL:
        return False
    cls = plugin.fn if isinstance(plugin.fn, type) else type(plugin.fn)
    return cls.fit is not keras_tuner.HyperModel.fit


def _users_model(plugin: Plugin, hp: Any, spec: DataSpec) -> keras.Model:
    try:
        if plugin.info.get("form") == HYPERMODEL:
            model = hypermodel_of(plugin).build(hp)
        elif plugin.info.get("takes_spec"):
            model = plugin.fn(hp, spec)
        else:
            model = plugin.fn(hp)
    except CnnforgeError:
        raise
    except Exception as exc:
        raise CnnforgeError(
            f"{_where(plugin)} failed to build: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, keras.Model):
        raise CnnforgeError(
            f"{_where(plugin)} returned a {type(model).__name__}; a build(hp) or build(hp, spec) "
            "plugin returns a keras.Model (use build(hp, inputs, spec) to return features)"
        )
    return model


def _layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _first_layer(model: keras.Model) -> keras.layers.Layer | None:
    layers = _layers(model)
    if not layers:
        return None
    first = layers[0]
    return _first_layer(first) if isinstance(first, keras.Model) else first


def _last_layer(model: keras.Model) -> keras.layers.Layer | None:
    if isinstance(model, keras.Sequential) or not getattr(model, "_outputs", None):
        layers = _layers(model)
        last = layers[-1] if layers else None
    else:
        last = model.outputs[0]._keras_history.operation
    return _last_layer(last) if isinstance(last, keras.Model) else last


def pixel_range(plugin: Plugin, model: keras.Model) -> tuple[float, float]:
    """The pixel range ``model`` takes: declared, or raw pixels behind a scaling first layer."""
    if "pixel_range" in plugin.info:
        return tuple(plugin.info["pixel_range"])  # type: ignore[return-value]
    if isinstance(_first_layer(model), SCALING_LAYERS):
        return RAW_PIXELS
    raise CnnforgeError(
        f"{_where(plugin)} returns a whole model that does not say which pixels it takes: "
        f"register it with @cnnforge.architecture({plugin.name!r}, pixel_range=(0, 1)) (or the "
        "range it was written for), or start it with a keras.layers.Rescaling layer to take raw "
        "0-255 pixels"
    )


def _is_softmax(layer: keras.layers.Layer | None) -> bool:
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def _input_shape(model: keras.Model) -> tuple | None:
    """The image shape ``model`` was built for; None for a Sequential without an Input."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    return tuple(inputs[0].shape[1:]) if inputs else None


def _fit_input(plugin: Plugin, model: keras.Model, spec: DataSpec, x: Any) -> Any:
    """``x`` (images of ``spec``) as ``model`` takes them: as they are, or, for a grayscale
    model written for ``(H, W)`` images (MNIST tutorials), without the channel axis."""
    shape, expected = _input_shape(model), tuple(spec.input_shape)
    if shape is None or shape == expected:
        return x
    if expected[-1] == 1 and shape == expected[:-1]:
        return keras.layers.Reshape(shape, name="drop_channel_axis")(x)
    raise CnnforgeError(
        f"{_where(plugin)} takes images of shape {shape}, but {spec.name} has {expected}: "
        "build its keras.Input from spec.input_shape (def build(hp, spec)), or search data of "
        "that shape"
    )


def _check_output(plugin: Plugin, model: keras.Model, outputs: Any, spec: DataSpec) -> None:
    shape = tuple(outputs.shape)
    if len(shape) != 2 or shape[-1] != spec.num_classes:
        raise CnnforgeError(
            f"{_where(plugin)} returns {shape[1:]} per image, but {spec.name} has "
            f"{spec.num_classes} classes: end it with "
            f"keras.layers.Dense({spec.num_classes}, activation='softmax') (spec.num_classes)"
        )
    last = _last_layer(model)
    if not _is_softmax(last):
        name = getattr(last, "name", "?")
        raise CnnforgeError(
            f"{_where(plugin)} ends with {name!r}, not a softmax: cnnforge exports probabilities, "
            f"so end it with keras.layers.Dense({spec.num_classes}, activation='softmax')"
        )


def _one_hot_loss(loss: Any) -> Any:
    """``loss`` for cnnforge's one-hot labels: a sparse categorical cross-entropy becomes the
    categorical one (the same maths on one-hot labels); any other loss is kept."""
    if isinstance(loss, str) and loss.lower() in ("sparse_categorical_crossentropy", "scce"):
        return "categorical_crossentropy"
    if loss is keras.losses.sparse_categorical_crossentropy:
        return "categorical_crossentropy"
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return keras.losses.CategoricalCrossentropy(from_logits=loss.get_config()["from_logits"])
    return loss


def compiled_by_user(model: keras.Model) -> bool:
    return bool(getattr(model, "compiled", False)) and getattr(model, "optimizer", None) is not None


# Wrappers compiled with their plugin's optimizer and loss: training keeps that compile.
_COMPILED_LIKE_USERS: weakref.WeakSet = weakref.WeakSet()


def is_compiled_like_users(model: keras.Model) -> bool:
    return model in _COMPILED_LIKE_USERS


def compile_like(wrapper: keras.Model, model: keras.Model) -> None:
    """Compile ``wrapper`` with a fresh copy of ``model``'s optimizer and its loss (one-hot)."""
    _COMPILED_LIKE_USERS.add(wrapper)
    optimizer = model.optimizer
    with wrapper.distribute_strategy.scope():
        wrapper.compile(
            optimizer=type(optimizer).from_config(optimizer.get_config()),
            loss=_one_hot_loss(model.loss),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )


def forget_compile(model: keras.Model) -> None:
    """Drop the inner model's own compile once the wrapper is compiled: saved inside the
    wrapper, its never-used optimizer would be restored on load and warned about."""
    model.optimizer = None
    model.compiled = False
    model._compile_config = None


def whole_model(plugin: Plugin, hp: Any, spec: DataSpec) -> tuple[keras.Model, keras.Model]:
    """The plugin's model wrapped in the contract, and the user's model itself (which says how
    it was compiled)."""
    model = _users_model(plugin, hp, spec)
    low, high = pixel_range(plugin, model)
    inputs = keras.Input(spec.input_shape, name=INPUT_NAME, dtype="float32")
    x = _fit_input(plugin, model, spec, inputs)
    if (low, high) != RAW_PIXELS:
        x = keras.layers.Rescaling((high - low) / 255.0, offset=low, name="pixel_scaling")(x)
    try:
        outputs = model(x)
    except Exception as exc:
        raise CnnforgeError(
            f"{_where(plugin)} cannot take images of shape {tuple(spec.input_shape)}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        ) from exc
    _check_output(plugin, model, outputs, spec)
    # float32 even under mixed precision: the exported output stays full precision
    outputs = keras.layers.Activation("linear", name=OUTPUT_NAME, dtype="float32")(outputs)
    return keras.Model(inputs, outputs, name=model_name(plugin)), model
