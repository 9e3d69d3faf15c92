"""What an ONNX model is, from the file alone: inputs, outputs, opset, operators, parameters,
FLOPs, size, and the ``cnnforge.*`` metadata (class names, pixel range, layout, source run,
precision, measured accuracy). Imports no TensorFlow; works on models from any exporter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnforge.core.contract import META_PREFIX
from cnnforge.deploy import onnxinfo
from cnnforge.deploy.onnxinfo import TensorInfo


@dataclass
class ModelInfo:
    path: str
    size_bytes: int
    producer: str
    ir_version: int
    opset: int | None
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    operators: dict[str, int]
    parameters: int
    parameters_by_type: dict[str, int]
    flops_per_image: int | None  # None where the graph's shapes cannot be inferred
    metadata: dict[str, Any]  # cnnforge.* entries, decoded
    other_metadata: dict[str, str]  # entries other exporters left


def _flops(proto: Any) -> int | None:
    try:
        return onnxinfo.flops_per_image(proto)
    except Exception:  # a graph that shape inference cannot follow: report the rest
        return None


def _metadata(proto: Any) -> tuple[dict[str, Any], dict[str, str]]:
    ours, others = {}, {}
    for entry in proto.metadata_props:
        if not entry.key.startswith(META_PREFIX):
            others[entry.key] = entry.value
            continue
        try:
            ours[entry.key[len(META_PREFIX) :]] = json.loads(entry.value)
        except json.JSONDecodeError:
            ours[entry.key[len(META_PREFIX) :]] = entry.value
    return ours, others


def inspect_model(path: Path | str) -> ModelInfo:
    """Read ``path`` (an ``.onnx`` file) and describe it."""
    proto = onnxinfo.load(path)
    ours, others = _metadata(proto)
    inputs, outputs = onnxinfo.signature(proto)
    producer = " ".join(p for p in (proto.producer_name, proto.producer_version) if p)
    return ModelInfo(
        path=str(path),
        size_bytes=Path(path).stat().st_size,
        producer=producer,
        ir_version=int(proto.ir_version),
        opset=onnxinfo.opset(proto),
        inputs=inputs,
        outputs=outputs,
        operators=onnxinfo.operator_counts(proto),
        parameters=onnxinfo.parameter_count(proto),
        parameters_by_type=onnxinfo.parameter_types(proto),
        flops_per_image=_flops(proto),
        metadata=ours,
        other_metadata=others,
    )
