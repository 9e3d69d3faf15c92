"""An ONNX model may point its weights only at files in its own folder, wherever in the graph the
tensor sits: top level, a subgraph (If/Loop), a node attribute, a sparse tensor, a function."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.runtime import check_external_data, open_session

OUTSIDE = "../../../etc/passwd"


def _external(name: str, location: str = OUTSIDE) -> TensorProto:
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _if_model(branch: onnx.GraphProto, **extra: Any) -> onnx.ModelProto:
    """``y = If(cond)`` whose both branches are ``branch``."""
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node],
        "outer",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        **extra,
    )
    return helper.make_model(graph)


def _branch(nodes: list, initializer: list | None = None, **extra: Any) -> onnx.GraphProto:
    out = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])
    return helper.make_graph(nodes, "branch", [], [out], initializer=initializer or [], **extra)


def _subgraph_initializer() -> onnx.ModelProto:
    identity = helper.make_node("Identity", ["w0"], ["w"])
    return _if_model(_branch([identity], [_external("w0")]))


def _subgraph_constant_attribute() -> onnx.ModelProto:
    return _if_model(_branch([helper.make_node("Constant", [], ["w"], value=_external("c"))]))


def _sparse_initializer() -> onnx.ModelProto:
    sparse = helper.make_sparse_tensor(
        _external("s"), numpy_helper.from_array(np.arange(4, dtype=np.int64), "i"), [4]
    )
    identity = helper.make_node("Identity", ["s"], ["w"])
    return _if_model(_branch([identity], sparse_initializer=[sparse]))


def _function_attribute() -> onnx.ModelProto:
    constant = helper.make_node("Constant", [], ["w"], value=_external("f"))
    function = helper.make_function(
        "local", "F", [], ["w"], [constant], [helper.make_opsetid("", 17)]
    )
    call = helper.make_node("F", [], ["y"], domain="local")
    graph = helper.make_graph(
        [call], "outer", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]
    )
    return helper.make_model(
        graph,
        functions=[function],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )


@pytest.mark.parametrize(
    "build",
    [_subgraph_initializer, _subgraph_constant_attribute, _sparse_initializer, _function_attribute],
)
def test_external_data_outside_the_folder_is_refused_wherever_the_tensor_sits(
    build: Callable[[], onnx.ModelProto], tmp_path: Path
):
    path = tmp_path / "evil.onnx"
    onnx.save_model(build(), path)
    with pytest.raises(
        CnnforgeError, match=r"evil\.onnx points its weights at .*outside its folder"
    ):
        open_session(path)


def test_external_data_beside_the_model_is_accepted(tmp_path: Path):
    identity = helper.make_node("Identity", ["w0"], ["w"])
    path = tmp_path / "fine.onnx"
    onnx.save_model(_if_model(_branch([identity], [_external("w0", "weights.bin")])), path)
    check_external_data(path)  # no error
