"""Graph facts read from ONNX alone: the image input, parameters, operators, FLOPs."""

from __future__ import annotations

import keras
import keras_tuner
import pytest

import cnnforge
from cnnforge.conversion.export import to_onnx
from cnnforge.core.errors import CnnforgeError
from cnnforge.data.dataset import DataSpec
from cnnforge.deploy import onnxinfo
from cnnforge.modeling.hypermodel import build_model


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


def test_flops_count_one_image_of_a_fixed_batch():
    import tiny_onnx

    per_image = tiny_onnx.conv_classifier_flops()
    assert onnxinfo.flops_per_image(tiny_onnx.conv_classifier(batch=4)) == per_image
    assert onnxinfo.flops_per_image(tiny_onnx.conv_classifier(batch="n")) == per_image


def test_flops_with_open_image_dims_need_input_shapes():
    import tiny_onnx

    open_dims = tiny_onnx.conv_classifier(batch="n")
    for dim in open_dims.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.ClearField("dim_value")
        dim.dim_param = "side"
    assert onnxinfo.flops_per_image(open_dims) == 2 * 8 * 4  # only the dense layer is countable
    given = onnxinfo.flops_per_image(open_dims, {"x": (3, 16, 16)})
    assert given == tiny_onnx.conv_classifier_flops()


@pytest.mark.parametrize("fmt", ["QOperator", "QDQ"])
def test_flops_of_int8_quantized_models_match_fp32(tmp_path, fmt):
    import numpy as np
    import onnx
    import tiny_onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Images(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"x": rng.random((1, 3, 16, 16), dtype=np.float32)}] * 2)

        def get_next(self):
            return next(self.batches, None)

    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(tiny_onnx.conv_classifier(batch="n"), str(fp32))
    quantize_static(str(fp32), str(int8), Images(), quant_format=getattr(QuantFormat, fmt))
    ops = onnxinfo.operator_counts(int8)
    assert ("QLinearConv" in ops) == (fmt == "QOperator")
    assert onnxinfo.flops_per_image(int8) == tiny_onnx.conv_classifier_flops()


def test_graph_inputs_leave_initializers_out():
    import tiny_onnx

    model = tiny_onnx.token_model(8)
    assert onnxinfo.inputs(model) == [
        onnxinfo.TensorInfo("ids", "int64", ("n", 8)),
        onnxinfo.TensorInfo("mask", "int64", ("n", 8)),
    ]


def _conv_then_transposed(*, unknown_op_between: bool):
    """Conv 3×3 (3→4, same) then ConvTranspose 3×3 stride 2 (4→2); optionally an operator of
    an unknown domain between them, so the ConvTranspose's input shape cannot be inferred."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "wt"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])]
    feature = "c"
    if unknown_op_between:
        nodes.append(helper.make_node("Mystery", ["c"], ["m"], domain="example.custom"))
        feature = "m"
    nodes.append(helper.make_node("ConvTranspose", [feature, "wt"], ["y"], strides=[2, 2]))
    graph = helper.make_graph(
        nodes,
        "transposed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 17, 17])],
        weights,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def test_conv_transpose_with_an_input_of_unknown_shape_is_left_out_of_the_flops():
    conv = 2 * 8 * 8 * 4 * 3 * 9  # 8×8×4 outputs, 3·3×3 MACs each
    transposed = 2 * (8 * 8 * 4) * 2 * 9  # each input value: 2 output channels × 3×3 MACs
    known = _conv_then_transposed(unknown_op_between=False)
    assert onnxinfo.flops_per_image(known) == conv + transposed
    unknown = _conv_then_transposed(unknown_op_between=True)
    assert onnxinfo.flops_per_image(unknown) == conv  # the ConvTranspose's FLOPs are unknown


def _upscaling_classifier(size: int) -> object:
    """28×28×1 pixels resized to ``size``×``size`` inside the graph, as a backbone run's are."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    scales = numpy_helper.from_array(np.array([1, 1, size / 28, size / 28], "float32"), "s")
    weights = numpy_helper.from_array(np.ones((8, 1, 3, 3), "float32"), "w")
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Resize", ["t", "", "s"], ["big"], mode="linear"),
        helper.make_node("Conv", ["big", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Softmax", ["f"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "upscaling",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 28, 28, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 8])],
        [scales, weights],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_largest_tensor_of_one_image_is_read_from_the_graph():
    """What a batch costs is set by the graph's largest tensor, not by its input: a backbone run
    takes 28×28 pixels and resizes them to 224 inside."""
    import tiny_onnx

    assert onnxinfo.largest_tensor_bytes(_upscaling_classifier(224)) == 224 * 224 * 8 * 4
    assert onnxinfo.largest_tensor_bytes(tiny_onnx.conv_classifier(size=16)) == 16 * 16 * 8 * 4


def test_prediction_batches_are_sized_to_a_memory_budget():
    import tiny_onnx

    from cnnforge.deploy.runtime import BATCH_MEMORY_BYTES, TENSORS_ALIVE, prediction_batch_size

    small = prediction_batch_size(tiny_onnx.conv_classifier(size=16))
    assert small == 256  # a small model keeps the usual batch
    big = _upscaling_classifier(448)
    batch = prediction_batch_size(big)
    assert 1 <= batch < 256
    assert batch * onnxinfo.largest_tensor_bytes(big) * TENSORS_ALIVE <= BATCH_MEMORY_BYTES


def test_the_largest_tensor_behind_a_computed_reshape_is_found():
    """tf2onnx writes Keras' Dense on a feature map as Reshape(Shape(x) ...) then MatMul:
    ConvNeXt's 4x-wide MLP tensors are only known with the shapes propagated."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    constants = [
        numpy_helper.from_array(np.array([0], "int64"), "zero"),
        numpy_helper.from_array(np.array([1], "int64"), "one"),
        numpy_helper.from_array(np.array([4], "int64"), "four"),
        numpy_helper.from_array(np.ones((4, 1024), "float32"), "w"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "four"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["wide"]),
        helper.make_node("ReduceMax", ["wide"], ["probabilities"], keepdims=0, axes=[1]),
    ]
    graph = helper.make_graph(
        nodes,
        "reshaped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 2])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n"])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert onnxinfo.largest_tensor_bytes(model) == 1024 * 4
