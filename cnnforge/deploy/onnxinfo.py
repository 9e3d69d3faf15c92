"""What an ONNX graph says about itself: image input (name, layout, shape), parameters, operator
counts and FLOPs per image. Imports no TensorFlow, and needs no cnnforge metadata, so it works on
models exported by any tool.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.errors import CnnforgeError


@dataclass(frozen=True)
class ImageInput:
    """The image input of a model: its name, layout and per-image shape (H, W, C order kept)."""

    name: str
    layout: str  # "NHWC" or "NCHW"
    shape: tuple[int, ...]  # per image, in the model's own layout
    dtype: str  # onnx element type name, e.g. "float32"
    batch: int | str | None  # fixed batch size, the symbolic name, or None

    @property
    def height_width(self) -> tuple[int, int]:
        return (
            (self.shape[0], self.shape[1])
            if self.layout == "NHWC"
            else (self.shape[1], self.shape[2])
        )

    @property
    def channels(self) -> int:
        return self.shape[2] if self.layout == "NHWC" else self.shape[0]

    @property
    def nhwc_shape(self) -> tuple[int, int, int]:
        """Per-image shape as (H, W, C), the order datasets and images are held in."""
        return (*self.height_width, self.channels)


def layout_from_shape(per_image: Sequence[Any]) -> str:
    """A guess from a per-image shape: NCHW when the first axis looks like channels (1, 3 or 4)
    and the last does not; otherwise NHWC. Metadata, where present, says it for sure."""
    return "NCHW" if per_image[0] in (1, 3, 4) and per_image[2] not in (1, 3, 4) else "NHWC"


def load(model: Path | str | bytes | Any) -> Any:
    """An onnx ModelProto from a path, bytes, or a ModelProto; a bad file is one clear line."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    try:
        if isinstance(model, bytes):
            return onnx.load_from_string(model)
        path = Path(model)
        if not path.is_file():
            raise CnnforgeError(f"ONNX model {path} does not exist; check the path")
        return onnx.load(str(path), load_external_data=False)
    except CnnforgeError:
        raise
    except Exception as exc:
        label = "" if isinstance(model, bytes) else f"{model} "
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CnnforgeError(
            f"cannot parse ONNX model {label}({reason}); is it a complete .onnx file?"
        ) from None


def _dims(value_info: Any) -> list[int | str | None]:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _graph_inputs(proto: Any) -> list[Any]:
    """Graph inputs that are real inputs (old exporters list initializers as inputs too)."""
    initializers = {init.name for init in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in initializers]


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, element type and shape (symbolic dims as names)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


def _tensor_info(value: Any) -> TensorInfo:
    import onnx

    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
    return TensorInfo(value.name, dtype, tuple(_dims(value)))


def signature(model: Any) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The graph's real inputs (initializers left out) and its outputs."""
    proto = load(model)
    return [_tensor_info(v) for v in _graph_inputs(proto)], [
        _tensor_info(v) for v in proto.graph.output
    ]


def inputs(model: Any) -> list[TensorInfo]:
    """Every real input of the graph (initializers left out), in graph order."""
    return signature(model)[0]


def image_input(model: Any) -> ImageInput:
    """Discover the image input: one 4-D input, channels first (1/3/4) or last."""
    import onnx

    proto = load(model)
    real = _graph_inputs(proto)
    if len(real) != 1:
        names = ", ".join(i.name for i in real)
        raise CnnforgeError(
            f"model has {len(real)} inputs ({names}); cnnforge expects one image input"
        )
    dims = _dims(real[0])
    dtype = onnx.helper.tensor_dtype_to_np_dtype(real[0].type.tensor_type.elem_type).name
    if len(dims) != 4:
        raise CnnforgeError(
            f"input {real[0].name!r} has shape {dims}; not an image model (expected 4-D NHWC or NCHW)"
        )
    batch, rest = dims[0], dims[1:]
    if not all(isinstance(d, int) for d in rest):
        raise CnnforgeError(
            f"input {real[0].name!r} has shape {dims} with unknown image dimensions; give them with --shape"
        )
    meta = {p.key: p.value for p in proto.metadata_props}
    layout = meta.get("cnnforge.input_layout", layout_from_shape(rest))
    return ImageInput(real[0].name, layout, tuple(rest), dtype, batch)  # type: ignore[arg-type]


def parameter_count(model: Any) -> int:
    """Number of values in the graph's initializers (weights and constants)."""
    proto = load(model)
    return int(sum(int(np.prod(init.dims)) if init.dims else 1 for init in proto.graph.initializer))


def parameter_types(model: Any) -> dict[str, int]:
    """Number of initializer values per element type (``{"int8": ..., "float32": ...}``): shows
    what a precision variant really stores."""
    import onnx

    counts: Counter[str] = Counter()
    for init in load(model).graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
        counts[dtype] += int(np.prod(init.dims)) if init.dims else 1
    return dict(counts.most_common())


def _sparse_parts(sparse: Any) -> Iterator[Any]:
    yield sparse.values
    yield sparse.indices


def _node_tensors(nodes: Iterable[Any]) -> Iterator[Any]:
    """The tensors held by node attributes, those of their subgraphs (If, Loop, Scan) too."""
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield from _sparse_parts(attribute.sparse_tensor)
            for sparse in attribute.sparse_tensors:
                yield from _sparse_parts(sparse)
            graphs = [attribute.g] if attribute.HasField("g") else []
            for graph in [*graphs, *attribute.graphs]:
                yield from _graph_tensors(graph)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from _sparse_parts(sparse)
    yield from _node_tensors(graph.node)


def tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto in the model: initializers (sparse ones' values and indices included),
    node attributes, in the main graph, its subgraphs and its functions. Wider than onnx's own
    ``external_data_helper._get_all_tensors``, which skips sparse tensors."""
    proto = load(model)
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        yield from _node_tensors(function.node)


def opset(model: Any) -> int | None:
    """The model's ONNX operator-set version (the default domain's)."""
    for entry in load(model).opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def operator_counts(model: Any) -> dict[str, int]:
    return dict(Counter(node.op_type for node in load(model).graph.node).most_common())


def _with_fixed_inputs(proto: Any, input_shapes: dict[str, tuple[int, ...]]) -> Any:
    """A copy whose dynamic batch axes are 1 and whose named inputs get the given per-item dims."""
    fixed = copy.deepcopy(proto)
    for value in [*fixed.graph.input, *fixed.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.name in input_shapes:
            per_item = input_shapes[value.name]
            while len(dims) < len(per_item) + 1:
                dims.add()
            for dim, size in zip(dims[1:], per_item, strict=False):
                dim.ClearField("dim_param")
                dim.dim_value = size
        if dims and not dims[0].HasField("dim_value"):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    for value in list(fixed.graph.value_info):
        fixed.graph.value_info.remove(value)
    return fixed


def flops_per_image(model: Any, input_shapes: dict[str, tuple[int, ...]] | None = None) -> int:
    """Floating-point operations (a multiply-add counts 2) of one image through the graph.

    Counts the layers that dominate a CNN's cost: Conv, ConvTranspose, MatMul and Gemm, and
    their quantized forms (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger, QGemm; a
    multiply-add of int8 values counts 2 as well). Element-wise, activation and pooling nodes
    are left out (a few per cent at most). ``input_shapes`` gives per-item dims (batch axis
    left out) for inputs whose dims the graph leaves open. A graph with a fixed batch of N
    counts N images, so the total is divided by N. 0 means nothing countable was found.
    """
    import onnx

    proto = load(model)
    batch = _fixed_batch(proto)
    inferred = onnx.shape_inference.infer_shapes(_with_fixed_inputs(proto, input_shapes or {}))
    graph = inferred.graph
    shapes = {v.name: _dims(v) for v in [*graph.input, *graph.output, *graph.value_info]}
    shapes.update({init.name: list(init.dims) for init in graph.initializer})
    total = 0
    for node in graph.node:
        total += _node_flops(node, shapes)
    return int(total) // batch


def largest_tensor_bytes(model: Any) -> int:
    """Bytes of the largest tensor the graph makes for one image (0: no shape is known).

    What running a batch costs in memory: a backbone run takes the dataset's 28×28 pixels and
    resizes them to 224×224 inside, so its input says nothing about it. Read from onnx's shape
    inference with the batch axis set to 1 (a fixed batch of N counts N images), shapes computed
    in the graph propagated too (tf2onnx's reshapes: ConvNeXt's largest tensors are behind them)."""
    import onnx

    proto = load(model)
    fixed = _with_fixed_inputs(proto, {})
    graph = onnx.shape_inference.infer_shapes(fixed, data_prop=True).graph
    largest = 0
    for value in [*graph.value_info, *graph.output]:
        dims = _dims(value)
        element = value.type.tensor_type.elem_type
        if not _known(dims) or element == onnx.TensorProto.UNDEFINED:
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(element).itemsize
        largest = max(largest, int(np.prod(dims)) * itemsize)
    return largest // _fixed_batch(proto)


def _fixed_batch(proto: Any) -> int:
    """The fixed batch size of the first input (1 when the batch axis is dynamic)."""
    real = _graph_inputs(proto)
    dims = _dims(real[0]) if real else []
    return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else 1


def _known(shape: list | None) -> bool:
    return bool(shape) and all(isinstance(d, int) for d in shape)


# Where each counted operator keeps its data and weight inputs.
_CONV_WEIGHT = {"Conv": 1, "ConvTranspose": 1, "ConvInteger": 1, "QLinearConv": 3}
_MATMUL_OPERANDS = {
    "MatMul": (0, 1),
    "Gemm": (0, 1),
    "MatMulInteger": (0, 1),
    "QLinearMatMul": (0, 3),
    "QGemm": (0, 3),  # com.microsoft, written by onnxruntime's QOperator quantization
}


def _node_flops(node: Any, shapes: dict[str, list]) -> int:
    out = shapes.get(node.output[0]) if node.output else None
    if node.op_type in _CONV_WEIGHT:
        weight = shapes.get(node.input[_CONV_WEIGHT[node.op_type]])
        if not (_known(out) and _known(weight)):
            return 0
        # weight: (Cout, Cin/group, kh, kw); per output element Cin/group * kh * kw MACs.
        per_output = int(np.prod(weight[1:]))
        if node.op_type == "ConvTranspose":
            # weight: (Cin, Cout/group, kh, kw); per input element Cout/group * kh * kw MACs.
            data = shapes.get(node.input[0])
            if not _known(data):
                return 0  # input shape not inferred: uncountable, like any other unknown shape
            return 2 * int(np.prod(data)) * weight[1] * int(np.prod(weight[2:]))
        return 2 * int(np.prod(out)) * per_output
    if node.op_type in _MATMUL_OPERANDS:
        a_index, b_index = _MATMUL_OPERANDS[node.op_type]
        a, b = shapes.get(node.input[a_index]), shapes.get(node.input[b_index])
        if not (_known(out) and _known(a)):
            # A dense layer after a dynamic Reshape: one row per image, (K, N) weights.
            return 2 * int(np.prod(b)) if _known(b) and len(b) == 2 else 0
        transposed = node.op_type in ("Gemm", "QGemm") and any(
            attr.name == "transA" and attr.i for attr in node.attribute
        )
        k = a[-2] if transposed else a[-1]
        return 2 * int(np.prod(out)) * k
    return 0
