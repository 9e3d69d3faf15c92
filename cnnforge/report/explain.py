"""What a trained model learned: the filters of its first conv layer and the feature maps that
its conv layers produce for one image.

Everything here returns plain data (arrays, dataclasses); ``cnnforge.report.plots.render_explanation``
draws it. Keras is imported inside the functions that need it.

Layers are named by their path: ``conv2d_1``, or ``backbone/block1_conv1`` for a layer inside a
nested model (a backbone wrapped as one layer), so deep backbones can be explained too.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.images import load_image

MAX_LAYERS = 12  # more conv layers than this: one per resolution stage, then evenly thinned
CONV_KINDS = ("Conv2D", "SeparableConv2D", "DepthwiseConv2D", "Conv2DTranspose")


@dataclass(frozen=True)
class LayerInfo:
    """A layer with a spatial (batch, H, W, C) output."""

    path: str
    kind: str
    output_shape: tuple[int, int, int]
    kernel_size: tuple[int, int] | None = None  # conv layers only

    @property
    def is_conv(self) -> bool:
        return self.kernel_size is not None

    @property
    def filters(self) -> int:
        """Output channels: one feature map per filter."""
        return self.output_shape[-1]


@dataclass
class FeatureMaps:
    layer: LayerInfo
    maps: np.ndarray  # (H, W, C): the layer's output for the image


@dataclass
class FilterBank:
    """The learned kernels of a conv layer, one small image per filter."""

    layer: LayerInfo
    kernels: np.ndarray  # (filters, kh, kw, 1 or 3)
    note: str = ""


@dataclass
class Explanation:
    model: str
    image: np.ndarray  # (H, W, C) raw pixels as the model saw them
    filters: FilterBank | None
    feature_maps: list[FeatureMaps]
    conv_layers: int  # how many conv layers the model has (some may not be shown)
    prediction: tuple[str, float] | None = None  # (class name, probability)
    notes: list[str] = field(default_factory=list)


def _is_model(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def _layer_info(layer: Any, path: str) -> LayerInfo | None:
    try:
        shape = tuple(layer.output.shape)
    except (AttributeError, ValueError):  # a shared layer has no single output
        return None
    if len(shape) != 4 or type(layer).__name__ == "InputLayer" or None in shape[1:]:
        return None
    kind = type(layer).__name__
    kernel = tuple(layer.kernel_size) if kind in CONV_KINDS else None
    return LayerInfo(path, kind, shape[1:], kernel)


def spatial_layers(model: Any, prefix: str = "") -> list[LayerInfo]:
    """Every layer with an image-shaped output, in graph order, nested models included."""
    found = []
    for layer in model.layers:
        if _is_model(layer):
            found += spatial_layers(layer, f"{prefix}{layer.name}/")
        elif info := _layer_info(layer, prefix + layer.name):
            found.append(info)
    return found


def representative_layers(conv: list[LayerInfo], limit: int = MAX_LAYERS) -> list[LayerInfo]:
    """All conv layers when there are few; otherwise the first one and the last one of each
    resolution stage (what each stage hands to the next), evenly thinned to ``limit``."""
    if len(conv) <= limit:
        return list(conv)
    stage_ends = [
        layer
        for i, layer in enumerate(conv)
        if i + 1 == len(conv) or conv[i + 1].output_shape[:2] != layer.output_shape[:2]
    ]
    picked = list(dict.fromkeys([conv[0], *stage_ends]))
    if len(picked) > limit:
        keep = np.unique(np.linspace(0, len(picked) - 1, limit).round().astype(int))
        picked = [picked[i] for i in keep]
    return picked


def choose_layers(model: Any, names: list[str] | None = None) -> list[LayerInfo]:
    """The layers ``names`` asks for (full path, or a name unique among the paths), or a
    representative set of conv layers; an unknown name lists the valid ones."""
    available = spatial_layers(model)
    if not names:
        return representative_layers([info for info in available if info.is_conv])
    by_path = {info.path: info for info in available}
    by_name: dict[str, list[LayerInfo]] = {}
    for info in available:
        by_name.setdefault(info.path.rsplit("/", 1)[-1], []).append(info)
    chosen = []
    for name in names:
        if name in by_path:
            chosen.append(by_path[name])
        elif len(by_name.get(name, [])) == 1:
            chosen.append(by_name[name][0])
        else:
            raise CnnforgeError(_unknown_layer_message(name, list(by_path), model.name))
    return chosen


def _unknown_layer_message(name: str, valid: list[str], model_name: str) -> str:
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    shown = ", ".join(valid[:40]) + (f" … and {len(valid) - 40} more" if len(valid) > 40 else "")
    return (
        f"model {model_name!r} has no layer {name!r} with an image-shaped output; {hint}"
        f"valid layers: {shown}"
    )


def _outer_input(nested: Any) -> Any:
    """The tensor that feeds a nested model in its parent's graph. Keras has no public way to
    ask this (``nested.input`` is the nested model's own input); tests cover it."""
    return nested._inbound_nodes[0].input_tensors[0]


def _activations(model: Any, x: np.ndarray, paths: set[str], prefix: str = "") -> dict:
    """The outputs of the layers at ``paths`` for the batch ``x``, through nested models."""
    import keras

    here = [layer for layer in model.layers if prefix + layer.name in paths]
    nested = [
        layer
        for layer in model.layers
        if _is_model(layer) and any(p.startswith(f"{prefix}{layer.name}/") for p in paths)
    ]
    tensors = [layer.output for layer in here] + [_outer_input(layer) for layer in nested]
    if not tensors:
        return {}
    values = keras.Model(model.inputs[0], tensors)(x, training=False)
    values = values if isinstance(values, (list, tuple)) else [values]  # one output: unwrapped
    values = [keras.ops.convert_to_numpy(v) for v in values]
    found = {prefix + layer.name: v for layer, v in zip(here, values[: len(here)], strict=True)}
    for layer, value in zip(nested, values[len(here) :], strict=True):
        found |= _activations(layer, value, paths, f"{prefix}{layer.name}/")
    return found


def feature_maps(model: Any, image: np.ndarray, layers: list[LayerInfo]) -> list[FeatureMaps]:
    """Each layer's output for one image (raw pixels, the model's input size)."""
    batch = image[np.newaxis].astype(np.float32)
    values = _activations(model, batch, {layer.path for layer in layers})
    return [FeatureMaps(layer, values[layer.path][0]) for layer in layers]


def _layer_at(model: Any, path: str) -> Any:
    for name in path.split("/"):
        model = model.get_layer(name)
    return model


def first_conv_filters(model: Any) -> FilterBank | None:
    """The kernels of the model's first conv layer as viewable images: grayscale or RGB when it
    sees 1 or 3 channels, otherwise averaged over its input channels (and said so)."""
    conv = next((info for info in spatial_layers(model) if info.is_conv), None)
    if conv is None:
        return None
    kernel = np.asarray(_layer_at(model, conv.path).get_weights()[0], dtype=np.float32)
    kh, kw, inputs, per_input = kernel.shape
    if conv.kind in ("SeparableConv2D", "DepthwiseConv2D"):  # one spatial filter per input channel
        return FilterBank(
            conv,
            kernel.reshape(kh, kw, 1, inputs * per_input).transpose(3, 0, 1, 2),
            "depthwise kernels, one per input channel",
        )
    if conv.kind == "Conv2DTranspose":  # (kh, kw, out, in)
        kernel = kernel.transpose(0, 1, 3, 2)
        inputs = kernel.shape[2]
    kernels = kernel.transpose(3, 0, 1, 2)
    if inputs in (1, 3):
        return FilterBank(conv, kernels)
    return FilterBank(
        conv, kernels.mean(axis=3, keepdims=True), f"averaged over {inputs} input channels"
    )


def explain_array(
    model: Any,
    image: np.ndarray,
    *,
    layers: list[str] | None = None,
    class_names: tuple[str, ...] | None = None,
    notes: list[str] | None = None,
) -> Explanation:
    """Filters, feature maps and prediction of a loaded Keras model for one image array."""
    import keras

    chosen = choose_layers(model, layers)
    classifier = keras.Model(model.inputs[0], model.outputs[0])  # one input: called plainly
    probabilities = np.asarray(classifier(image[np.newaxis].astype(np.float32), training=False))[0]
    top = int(probabilities.argmax())
    name = class_names[top] if class_names and top < len(class_names) else str(top)
    conv_count = sum(info.is_conv for info in spatial_layers(model))
    return Explanation(
        model=model.name,
        image=image,
        filters=first_conv_filters(model),
        feature_maps=feature_maps(model, image, chosen),
        conv_layers=conv_count,
        prediction=(name, float(probabilities[top])),
        notes=list(notes or []),
    )


@dataclass
class ExplainResult:
    explanation: Explanation
    figure: Path


def explain(
    model_path: Path | str,
    image_path: Path | str,
    output: Path | str | None = None,
    *,
    layers: list[str] | None = None,
) -> ExplainResult:
    """Explain ``model_path`` (a .keras file or run directory) on an image file; write a PNG
    (default: ``<image stem>-explained.png`` beside the image)."""
    from cnnforge.core.atomic import atomic_write_bytes
    from cnnforge.modeling.keras_io import load_keras_model, resolve_source
    from cnnforge.report.plots import render_explanation

    image_path = Path(image_path)
    output = Path(output) if output else image_path.with_name(f"{image_path.stem}-explained.png")
    if output.suffix.lower() != ".png":
        raise CnnforgeError(f"output {output} must end in .png")
    source = resolve_source(model_path)
    model = load_keras_model(source.keras_path)
    input_shape = tuple(model.inputs[0].shape[1:])
    if input_shape[-1] not in (1, 3):
        raise CnnforgeError(
            f"the model takes {input_shape[-1]}-channel images; explain handles 1 or 3"
        )
    preprocessing = source.preprocessing if source.preprocessing else input_shape
    loaded = load_image(image_path, preprocessing)  # as predict reads it: EXIF-upright, fitted
    explanation = explain_array(
        model, loaded.pixels, layers=layers, class_names=source.class_names, notes=loaded.notes
    )
    atomic_write_bytes(output, render_explanation(explanation, title=image_path.name))
    return ExplainResult(explanation, output)
