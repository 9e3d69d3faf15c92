"""Keras-level rewrites that make any Keras model convertible by tf2onnx, with the same maths.

``to_onnx`` applies them to every model it converts, ours or a user's ``.keras`` file:

- a ``Conv2D`` whose ``groups`` equal its input and output channels (ConvNeXt's depthwise
  convolutions) becomes a ``DepthwiseConv2D``. Both compute the same per-channel convolution, but
  Keras runs a grouped ``Conv2D`` through an XLA-compiled TensorFlow function on CPU, which
  tf2onnx cannot convert (onnxruntime then refuses the graph as INVALID_GRAPH);
  ``DepthwiseConv2D`` converts to an ONNX ``Conv``. The kernels are carried over, reordered.

Models nested in the model (a backbone inside a classifier) are rewritten too. Layers that need
no rewrite are reused as they are, so the rewritten model shares their weights with the original.
A model holding no such layer is returned unchanged. ``handlers.py`` holds the op-level fixes
(TensorFlow ops tf2onnx lacks).
"""

from __future__ import annotations

from typing import Any


def _is_grouped_depthwise(layer: Any) -> bool:
    import keras

    return (
        isinstance(layer, keras.layers.Conv2D)
        and not isinstance(layer, keras.layers.DepthwiseConv2D)
        and layer.groups > 1
        and layer.groups == layer.filters == layer.input.shape[-1]
    )


def _needs_rewrite(model: Any) -> bool:
    import keras

    return any(
        _is_grouped_depthwise(layer) or (isinstance(layer, keras.Model) and _needs_rewrite(layer))
        for layer in getattr(model, "layers", [])
    )


def _as_depthwise(layer: Any) -> Any:
    import keras

    depthwise = keras.layers.DepthwiseConv2D(
        layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        activation=layer.activation,
        use_bias=layer.use_bias,
        name=layer.name,
        dtype=layer.dtype_policy,
    )
    depthwise.build(layer.input.shape)
    weights = layer.get_weights()
    weights[0] = weights[0].transpose(0, 1, 3, 2)  # (kh, kw, 1, channels) → (kh, kw, channels, 1)
    depthwise.set_weights(weights)
    return depthwise


def grouped_to_depthwise(model: Any) -> Any:
    """``model`` with every depthwise-grouped ``Conv2D`` (nested models included) as a
    ``DepthwiseConv2D`` holding the same weights; ``model`` itself if it has none."""
    import keras

    if not _needs_rewrite(model):
        return model

    def clone(layer: Any) -> Any:
        if _is_grouped_depthwise(layer):
            return _as_depthwise(layer)
        if isinstance(layer, keras.Model):
            return grouped_to_depthwise(layer)
        return layer

    return keras.models.clone_model(model, clone_function=clone)


def convertible(model: Any) -> Any:
    """``model`` with every rewrite of this module applied."""
    return grouped_to_depthwise(model)
