"""Tiny ONNX models made with onnx.helper, as another tool would export them (no cnnforge
metadata unless asked): an image classifier in either layout, and a two-input token model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FILTERS = 8


def conv_classifier(
    *,
    layout: str = "NCHW",
    batch: int | str = "n",
    channels: int = 3,
    size: int = 16,
    classes: int = 4,
    metadata: dict[str, str] | None = None,
) -> Any:
    """Conv 3×3 (8 filters, same padding) → Relu → global average pool → Gemm → Softmax."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(
            rng.standard_normal((FILTERS, channels, 3, 3)).astype(np.float32), "w"
        ),
        numpy_helper.from_array(rng.standard_normal((FILTERS, classes)).astype(np.float32), "d"),
    ]
    dims = [batch, channels, size, size] if layout == "NCHW" else [batch, size, size, channels]
    nodes = []
    first = "x"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]))
        first = "xt"
    nodes += [
        helper.make_node("Conv", [first, "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "d"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, classes])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def conv_classifier_flops(channels: int = 3, size: int = 16, classes: int = 4) -> int:
    return 2 * (size * size * FILTERS * channels * 9 + FILTERS * classes)


def token_model(length: int = 16) -> Any:
    """Two int64 inputs (ids, mask) of [n, length]: not an image model."""
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["n", length])
        for name in ("ids", "mask")
    ]
    nodes = [
        helper.make_node("Mul", ["ids", "mask"], ["m"]),
        helper.make_node("Cast", ["m"], ["out"], to=TensorProto.FLOAT),
    ]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", length])
    graph = helper.make_graph(nodes, "tokens", inputs, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def batch_one_reshape(width: int = 4) -> Any:
    """Declares a dynamic batch but reshapes to a batch of 1: runs at batch 1 only."""
    shape = numpy_helper.from_array(np.array([1, width], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        [shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save(model: Any, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
