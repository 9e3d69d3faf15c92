"""Keras-level rewrites for tf2onnx: every model export converts, a user's file included."""

from __future__ import annotations

import keras
import numpy as np
import onnx

from cnnforge.conversion.export import export, to_onnx
from cnnforge.conversion.parity import check_parity
from cnnforge.conversion.rewrite import grouped_to_depthwise


def _grouped_model(nested: bool) -> keras.Model:
    inputs = keras.Input((9, 9, 6))
    x = keras.layers.Conv2D(6, 3, groups=6, padding="same", name="grouped")(inputs)
    body = keras.Model(inputs, keras.layers.Conv2D(4, 1, name="pointwise")(x), name="body")
    if not nested:
        return body
    images = keras.Input((9, 9, 6), name="images")
    x = keras.layers.GlobalAveragePooling2D()(body(images))
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(x)
    return keras.Model(images, outputs)


def _randomise(model: keras.Model, seed: int = 2) -> None:
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])


def test_grouped_convolutions_become_depthwise_with_the_same_answers():
    model = _grouped_model(nested=False)
    _randomise(model)
    rewritten = grouped_to_depthwise(model)
    assert isinstance(rewritten.get_layer("grouped"), keras.layers.DepthwiseConv2D)
    x = np.random.default_rng(3).normal(size=(2, 9, 9, 6)).astype("float32")
    np.testing.assert_allclose(rewritten(x), model(x), rtol=1e-5, atol=1e-5)


def test_nested_models_are_rewritten_and_a_clean_model_is_left_alone():
    model = _grouped_model(nested=True)
    _randomise(model)
    rewritten = grouped_to_depthwise(model)
    layer = rewritten.get_layer("body").get_layer("grouped")
    assert isinstance(layer, keras.layers.DepthwiseConv2D)
    assert isinstance(model.get_layer("body").get_layer("grouped"), keras.layers.Conv2D)
    clean = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten()])
    assert grouped_to_depthwise(clean) is clean


def test_a_users_keras_file_with_grouped_convolutions_exports_with_parity(tmp_path):
    model = _grouped_model(nested=True)
    _randomise(model)
    path = tmp_path / "user.keras"
    model.save(path)
    result = export(path)
    assert result.parity.passed, result.parity.mismatches
    ops = {node.op_type for node in onnx.load(result.onnx_path).graph.node}
    assert "Conv" in ops and not any("Call" in op for op in ops)


def test_to_onnx_converts_grouped_convolutions_to_what_onnxruntime_runs():
    model = _grouped_model(nested=True)
    _randomise(model, seed=5)
    proto = to_onnx(model)
    pixels = np.random.default_rng(4).uniform(0, 1, (8, 9, 9, 6)).astype("float32")
    report = check_parity(model, proto.SerializeToString(), pixels, inputs="random", atol=1e-4)
    assert report.passed, report.mismatches
