"""Graph facts read from ONNX alone: the image input, parameters, operators, FLOPs."""

from __future__ import annotations

import keras
import keras_tuner
import pytest

import cnnforge
from cnnforge import onnxinfo
from cnnforge.data import DataSpec
from cnnforge.errors import CnnforgeError
from cnnforge.export import to_onnx
from cnnforge.hypermodel import build_model


@pytest.fixture(scope="module")
def tutorial_cnn_onnx():
    spec = DataSpec("cifar-like", (32, 32, 3), tuple(str(i) for i in range(10)))
    model = build_model(
        cnnforge.get("architecture", "simple_cnn"), spec, keras_tuner.HyperParameters()
    )
    return to_onnx(model)


def test_flops_of_the_tutorial_cnn_match_the_hand_count(tutorial_cnn_onnx):
    macs = 30 * 30 * 32 * 27 + 13 * 13 * 64 * 288 + 4 * 4 * 64 * 576 + 1024 * 64 + 64 * 10
    assert onnxinfo.flops_per_image(tutorial_cnn_onnx) == 2 * macs


def test_image_input_and_operators(tutorial_cnn_onnx):
    image = onnxinfo.image_input(tutorial_cnn_onnx)
    assert (image.name, image.layout, image.shape, image.dtype) == (
        "images",
        "NHWC",
        (32, 32, 3),
        "float32",
    )
    assert image.height_width == (32, 32) and image.channels == 3 and image.batch == "batch"
    ops = onnxinfo.operator_counts(tutorial_cnn_onnx)
    assert ops["Conv"] == 3 and ops["MatMul"] == 2 and ops["Softmax"] == 1
    assert 120_000 < onnxinfo.parameter_count(tutorial_cnn_onnx) <= 122_570


def test_channels_first_input_is_recognised():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    image = onnxinfo.image_input(helper.make_model(graph))
    assert image.layout == "NCHW" and image.height_width == (8, 8) and image.channels == 3


def test_non_image_model_is_a_clear_error():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["n", 128])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["n", 128])
    graph = helper.make_graph([helper.make_node("Identity", ["tokens"], ["y"])], "g", [x], [y])
    with pytest.raises(CnnforgeError, match="not an image model"):
        onnxinfo.image_input(helper.make_model(graph))


def test_depthwise_convolution_flops_count_groups():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.DepthwiseConv2D(3, padding="same")(inputs)
    model = keras.Model(
        inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x))
    )
    # depthwise: 8*8*4 outputs, 3*3 MACs each; dense: 256*2 MACs
    assert onnxinfo.flops_per_image(to_onnx(model)) == 2 * (8 * 8 * 4 * 9 + 256 * 2)
