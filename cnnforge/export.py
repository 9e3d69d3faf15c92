"""Keras → ONNX with the cnnforge contract, metadata, and a parity check before anything is kept.

The exported model has one input ``images`` (float32, NHWC, raw pixels 0–255, dynamic batch)
and one output ``probabilities`` (batch × classes). It is converted with
``tf2onnx.convert.from_keras`` on a functional model: ``from_function`` turns the constants of a
``Normalization`` layer into graph inputs, and ``from_keras`` fails on Keras 3 ``Sequential``
models, which are therefore re-wrapped as functional models first.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge import __version__, onnx_handlers
from cnnforge.artifacts import atomic_write_bytes, atomic_write_text
from cnnforge.data import load_dataset
from cnnforge.errors import CnnforgeError
from cnnforge.hypermodel import INPUT_NAME, OUTPUT_NAME
from cnnforge.parity import ParityReport, check_parity
from cnnforge.runtime import META_PREFIX

DEFAULT_OPSET = 17


@dataclass
class ExportResult:
    onnx_path: Path
    parity_path: Path
    parity: ParityReport
    opset: int
    seconds: float
    size_bytes: int


@dataclass(frozen=True)
class ExportSource:
    """A ``.keras`` file and what its run directory knows (data source, class names)."""

    keras_path: Path
    run_dir: Path | None
    data: str | None
    class_names: tuple[str, ...] | None


def resolve_source(source: Path | str) -> ExportSource:
    """A run directory (its ``best.keras``) or a ``.keras`` file, with its run's config if any."""
    path = Path(source)
    keras_path = path / "best.keras" if path.is_dir() else path
    if not keras_path.is_file():
        what = (
            f"run directory {path} has no best.keras" if path.is_dir() else f"{path} does not exist"
        )
        raise CnnforgeError(f"{what}; give a finished run directory or a .keras file")
    config_file = keras_path.parent / "config.json"
    if not config_file.is_file():
        return ExportSource(keras_path, None, None, None)
    config = json.loads(config_file.read_text())
    return ExportSource(
        keras_path,
        keras_path.parent,
        config["search"]["data"],
        tuple(config["data_spec"]["class_names"]),
    )


def load_keras_model(path: Path, *, safe_mode: bool = True) -> Any:
    """Load a ``.keras`` file in Keras' safe mode; a broken file is a one-line error."""
    import keras

    try:
        return keras.models.load_model(path, safe_mode=safe_mode)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CnnforgeError(
            f"cannot load Keras model {path} ({reason[:200]}); is it a complete .keras file?"
        ) from None


def as_functional(model: Any) -> Any:
    """The same layers as a functional model (``from_keras`` needs one)."""
    import keras

    if isinstance(model, keras.Sequential):
        if not model.built or not model.inputs:
            raise CnnforgeError(
                "the Sequential model has no Input; build it with keras.Input first"
            )
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def _rename_value(graph: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*graph.input, *graph.output]:
        if value.name == old:
            value.name = new


def _name_batch_axis(graph: Any) -> None:
    for value in [*graph.input, *graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"


def to_onnx(
    model: Any, *, opset: int = DEFAULT_OPSET, metadata: dict[str, Any] | None = None
) -> Any:
    """Convert ``model`` to an ONNX ModelProto with the cnnforge input/output contract."""
    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    model = as_functional(model)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise CnnforgeError("cnnforge exports models with one image input and one output")
    input_shape = tuple(model.inputs[0].shape)
    if len(input_shape) != 4 or len(model.outputs[0].shape) != 2:
        raise CnnforgeError(
            f"model takes {input_shape} and returns {tuple(model.outputs[0].shape)}; cnnforge "
            "exports image classifiers: (batch, H, W, C) in, (batch, classes) out"
        )
    signature = (tf.TensorSpec((None, *input_shape[1:]), tf.float32, name=INPUT_NAME),)
    try:
        proto, _ = tf2onnx.convert.from_keras(
            model,
            input_signature=signature,
            opset=opset,
            custom_op_handlers=onnx_handlers.custom_op_handlers(),
        )
    except Exception as exc:
        raise CnnforgeError(
            f"tf2onnx could not convert the model at opset {opset} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); try another --opset"
        ) from exc
    _rename_value(proto.graph, proto.graph.input[0].name, INPUT_NAME)
    _rename_value(proto.graph, proto.graph.output[0].name, OUTPUT_NAME)
    _name_batch_axis(proto.graph)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = (
            META_PREFIX + key,
            value if isinstance(value, str) else json.dumps(value),
        )
    proto.producer_name = "cnnforge"
    proto.producer_version = __version__
    return proto


def _metadata(model: Any, source: ExportSource, class_names: tuple[str, ...]) -> dict[str, Any]:
    import keras
    import tensorflow as tf
    import tf2onnx

    return {
        "class_names": list(class_names),
        "input_layout": "NHWC",
        "input_shape": list(model.inputs[0].shape[1:]),
        "pixel_range": [0, 255],
        "precision": "fp32",
        "source": str(source.keras_path),
        "versions": {
            "cnnforge": __version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
            "tf2onnx": tf2onnx.__version__,
        },
    }


def parity_images(source: ExportSource, data: str | None, input_shape: tuple, count: int = 256):
    """Real test images where the data source is known; otherwise seeded random pixels."""
    data = data or source.data
    if data:
        dataset = load_dataset(data)
        if dataset.x_test.shape[1:] == tuple(input_shape):
            return dataset.x_test[:count].astype(np.float32), f"test split of {data}"
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (count, *input_shape)).astype(np.float32), "random pixels"


def export(
    source: Path | str,
    output: Path | str | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    data: str | None = None,
    atol: float = 1e-4,
) -> ExportResult:
    """Export a run directory or ``.keras`` file to ONNX; check parity; keep both only if it holds."""
    resolved = resolve_source(source)
    output = (
        Path(output) if output else (resolved.run_dir or resolved.keras_path.parent) / "model.onnx"
    )
    if output.suffix != ".onnx":
        raise CnnforgeError(f"output {output} must end in .onnx")
    model = load_keras_model(resolved.keras_path)
    classes = int(model.outputs[0].shape[-1])
    class_names = resolved.class_names or tuple(str(i) for i in range(classes))

    start = time.perf_counter()
    proto = to_onnx(model, opset=opset, metadata=_metadata(model, resolved, class_names))
    seconds = time.perf_counter() - start
    onnx_bytes = proto.SerializeToString()

    images, described = parity_images(resolved, data, tuple(model.inputs[0].shape[1:]))
    report = check_parity(model, onnx_bytes, images, inputs=described, atol=atol)
    report.opset = opset
    parity_path = output.with_name("parity.json")
    atomic_write_text(parity_path, json.dumps(asdict(report), indent=2))
    if not report.passed:
        raise CnnforgeError(f"export of {resolved.keras_path} failed parity: {report.summary()}")
    atomic_write_bytes(output, onnx_bytes)
    return ExportResult(output, parity_path, report, opset, seconds, len(onnx_bytes))
