"""The Open Inference Protocol ("KServe v2", Triton's) without a web framework: what the REST
routes (:mod:`cnnforge.deploy.serve_v2`, their body format in :mod:`cnnforge.deploy.v2_rest`)
and the gRPC service (:mod:`cnnforge.deploy.serve_grpc`) share.

A served model has two inputs and one or two outputs:

- its own pixel tensor (the ONNX input's name, e.g. ``images``; shape ``[-1, *per_image]`` in
  the model's layout): ``FP32`` is the model's input as it is (pixels already in its pixel
  range), ``UINT8`` is 0–255 pixels, scaled as ``cnnforge predict`` scales them. A tensor of
  many images is one batcher job: nothing is decoded.
- ``image`` (``BYTES``, shape ``[-1]``): encoded image files (PNG, JPEG, ...) decoded and
  preprocessed by the same code as ``cnnforge predict`` and ``POST /predict``.
- its probabilities (``FP32 [-1, classes]``), or with Triton's classification extension
  (``classification: k``) the top ``k`` as ``BYTES`` strings ``"value:index:label"``;
- where the graph has one (a calibrated export), its ``ood_score`` (``FP32 [-1]``): how like the
  training images each image is, the score the "unknown" threshold of the metadata reads.

A request carries exactly one of the two inputs. Every refusal is a :class:`ProtocolError`
(one line: HTTP 400, gRPC INVALID_ARGUMENT); a full queue is
:class:`cnnforge.deploy.batching.Overloaded` (HTTP 503, gRPC UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnforge.core.contract import OOD_OUTPUT_NAME
from cnnforge.core.errors import CnnforgeError
from cnnforge.core.preprocessing import scale
from cnnforge.core.version import __version__
from cnnforge.deploy.batching import Overloaded
from cnnforge.deploy.predict import Classifier, Rows
from cnnforge.deploy.serve_requests import RequestError

if TYPE_CHECKING:
    from cnnforge.deploy.serve_service import Service

IMAGE_INPUT = "image"
IMAGE_INPUT_ALTERNATIVE = "encoded_image"  # where the model's own input is called "image"
PLATFORM = "onnxruntime_onnx"
VERSION = "1"
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository")
BYTES_PREFIX = struct.Struct("<I")  # Triton's BYTES element: 4-byte little-endian length

# the protocol's datatypes with a fixed item size, little-endian as the binary extension is
NUMPY_TYPES: dict[str, np.dtype] = {
    name: np.dtype(kind).newbyteorder("<")
    for name, kind in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}
DATATYPES = (*NUMPY_TYPES, "BYTES")
PIXEL_TYPES = ("FP32", "UINT8")

Tensor = np.ndarray | list[bytes]


class ProtocolError(CnnforgeError):
    """A request the protocol refuses, in one line (REST 400 ``{"error": ...}``, gRPC
    INVALID_ARGUMENT). ``reason`` labels it in the server's metrics."""

    def __init__(self, message: str, reason: str = "bad_tensor") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TensorSpec:
    """One input or output in the model's metadata; ``-1`` in ``shape`` is the batch axis.
    ``accepts``: the datatypes taken as this input (the first is ``datatype``)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    accepts: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSpec:
    """A served model as the protocol's model metadata describes it."""

    name: str
    versions: tuple[str, ...] = (VERSION,)
    platform: str = PLATFORM
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": self.platform,
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
        }


@dataclass(frozen=True)
class OutputRequest:
    """One output asked for: its name, the top ``classification`` classes instead of the
    tensor, and whether it travels as binary data (the REST binary extension)."""

    name: str
    classification: int | None = None
    binary: bool = False


@dataclass(frozen=True)
class OutputTensor:
    """One output of an answer. ``array``: float32 for FP32; for BYTES an object array of
    ``bytes``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class _Tensors:
    pixels: TensorSpec
    image: TensorSpec
    output: TensorSpec
    score: TensorSpec | None = None  # the graph's ``ood_score``, where it has one

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (self.output,) if self.score is None else (self.output, self.score)


def model_spec(service_or_classifier: Service | Classifier, name: str) -> ModelSpec:
    """The metadata of the model served as ``name``."""
    tensors = _tensors(_classifier(service_or_classifier))
    return ModelSpec(name, inputs=(tensors.pixels, tensors.image), outputs=tensors.outputs)


def server_metadata() -> dict[str, Any]:
    """The protocol's server metadata."""
    return {"name": "cnnforge", "version": __version__, "extensions": list(EXTENSIONS)}


def _classifier(service_or_classifier: Service | Classifier) -> Classifier:
    return getattr(service_or_classifier, "classifier", service_or_classifier)


# one per classifier, read once, gone with it (a cache holding sessions would hold their memory)
_TENSORS: weakref.WeakKeyDictionary[Classifier, _Tensors] = weakref.WeakKeyDictionary()


def _tensors(classifier: Classifier) -> _Tensors:
    """The protocol's view of ``classifier``'s graph."""
    if (known := _TENSORS.get(classifier)) is None:
        known = _TENSORS[classifier] = _read_tensors(classifier)
    return known


def _read_tensors(classifier: Classifier) -> _Tensors:
    graph_input = classifier.session.get_inputs()[0]
    graph_output = classifier.session.get_outputs()[0]
    image = IMAGE_INPUT if graph_input.name != IMAGE_INPUT else IMAGE_INPUT_ALTERNATIVE
    classes = len(classifier.class_names or ()) or graph_output.shape[-1]
    score = classifier.score_output if classifier.score_output == OOD_OUTPUT_NAME else None
    return _Tensors(
        TensorSpec(graph_input.name, "FP32", (-1, *graph_input.shape[1:]), PIXEL_TYPES),
        TensorSpec(image, "BYTES", (-1,), ("BYTES",)),
        TensorSpec(graph_output.name, "FP32", (-1, classes)),
        TensorSpec(score, "FP32", (-1,)) if score else None,
    )


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """``shape`` as a tuple of whole numbers of at least 0, else one line."""
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(f"input {name!r}: shape must be a list of whole numbers, got {shape!r}")
    return tuple(shape)


def _numpy_type(name: str, datatype: Any) -> np.dtype:
    if datatype not in NUMPY_TYPES:
        raise ProtocolError(
            f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}"
        )
    return NUMPY_TYPES[datatype]


def tensor_from_json(name: str, datatype: str, shape: Sequence[int], data: Any) -> Tensor:
    """A tensor given as JSON ``data`` (flat or nested, row-major). BYTES elements are
    base64 strings (JSON strings cannot carry an image's bytes), given back as ``bytes``."""
    shape = check_shape(name, shape)
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_json(name, shape, count, data)
    dtype = _numpy_type(name, datatype)
    try:
        values = np.asarray(data)
    except (ValueError, TypeError):
        raise ProtocolError(f"input {name!r}: data is not a regular array of numbers") from None
    allowed = "b" if dtype.kind == "b" else "biu" if dtype.kind in "iu" else "biuf"
    if values.dtype.kind not in allowed or values.size != count:
        what = f"{values.size} values" if values.dtype.kind in "biuf" else "data that is no numbers"
        raise ProtocolError(
            f"input {name!r}: {what} for shape {list(shape)} of {datatype} (it needs {count} "
            f"{'whole numbers' if dtype.kind in 'iu' else 'numbers'})"
        )
    if dtype.kind in "iu" and values.size:
        low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
        if values.min() < low or values.max() > high:
            raise ProtocolError(f"input {name!r}: {datatype} values must be from {low} to {high}")
    return values.astype(dtype, copy=False).reshape(shape)


def _bytes_from_json(name: str, shape: tuple[int, ...], count: int, data: Any) -> list[bytes]:
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise ProtocolError(f"input {name!r}: BYTES data must be a flat list of base64 strings")
    if len(data) != count:
        raise ProtocolError(f"input {name!r}: {len(data)} elements for shape {list(shape)}")
    try:
        return [base64.b64decode(item, validate=True) for item in data]
    except (binascii.Error, ValueError):
        raise ProtocolError(
            f"input {name!r}: BYTES data in JSON must be base64; or send the bytes with the "
            "binary tensor data extension"
        ) from None


def tensor_from_bytes(
    name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview
) -> Tensor:
    """A tensor sent as binary data: the bytes of a fixed-size datatype in row-major order
    (read in place, no copy), or BYTES elements each after its 4-byte little-endian length."""
    shape = check_shape(name, shape)
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(name, shape, count, memoryview(raw))
    dtype = _numpy_type(name, datatype)
    needed = count * dtype.itemsize
    if len(raw) != needed:
        raise ProtocolError(
            f"input {name!r}: {len(raw):,} bytes of binary data, but shape {list(shape)} of "
            f"{datatype} is {needed:,} bytes; send {dtype.itemsize} byte"
            f"{'s' if dtype.itemsize > 1 else ''} per element"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _bytes_elements(name: str, shape: tuple[int, ...], count: int, raw: memoryview) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            break
        (size,) = BYTES_PREFIX.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise ProtocolError(
                f"input {name!r}: element {len(items)} says {size:,} bytes but only "
                f"{len(raw) - offset:,} follow; each element is a 4-byte little-endian length "
                "and its bytes"
            )
        items.append(bytes(raw[offset : offset + size]))
        offset += size
    if offset != len(raw) or len(items) != count:
        raise ProtocolError(
            f"input {name!r}: binary data holds {len(items)} BYTES element"
            f"{'s' if len(items) != 1 else ''}"
            + (f" and {len(raw) - offset} stray bytes" if offset != len(raw) else "")
            + f", shape {list(shape)} needs {count}; each element is a 4-byte little-endian "
            "length and its bytes"
        )
    return items


def bytes_tensor_to_wire(items: Sequence[bytes]) -> bytes:
    """BYTES elements in Triton's binary format: each after its 4-byte little-endian length."""
    return b"".join(BYTES_PREFIX.pack(len(item)) + item for item in items)


def output_request(name: str, parameters: dict[str, Any], binary: bool = False) -> OutputRequest:
    """An output asked for with the protocol's ``parameters`` (``classification``, and
    ``binary_data`` over REST; ``binary`` where it does not say)."""
    k = parameters.get("classification")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ProtocolError(
            f"output {name!r}: classification must be a whole number of at least 1, got {k!r}"
        )
    wants_binary = parameters.get("binary_data", binary)
    if not isinstance(wants_binary, bool):
        raise ProtocolError(f"output {name!r}: binary_data must be true or false")
    return OutputRequest(name, k, wants_binary)


async def infer(
    service: Service, inputs: dict[str, Tensor], outputs: Sequence[OutputRequest] = ()
) -> list[OutputTensor]:
    """Run one request through ``service``'s batcher: its one input (the pixel tensor, sent
    on as one job; or encoded images, decoded as ``/predict`` does) and the ``outputs`` asked
    for (all, as tensors, where none is)."""
    tensors = _tensors(service.classifier)
    wanted = list(outputs) or [OutputRequest(spec.name) for spec in tensors.outputs]
    names = [spec.name for spec in tensors.outputs]
    for request in wanted:
        if request.name not in names:
            raise ProtocolError(
                f"unknown output {request.name!r}; this model's outputs are "
                f"{', '.join(map(repr, names))}"
            )
        if request.classification is not None and request.name != tensors.output.name:
            raise ProtocolError(
                f"output {request.name!r}: classification applies to {tensors.output.name!r} only"
            )
    name, tensor = _one_input(inputs, tensors)
    if service.full:
        raise Overloaded
    service.arriving += 1  # the batcher waits for it while it is prepared
    try:
        if name == tensors.pixels.name:
            batch = _pixel_batch(service, tensors.pixels, tensor)
        else:
            batch = await _decoded_batch(service, name, tensor)
    finally:
        service.arriving -= 1
    rows = await service.batcher.submit(batch)
    return [_output(service.classifier, request, rows) for request in wanted]


def _one_input(inputs: dict[str, Tensor], tensors: _Tensors) -> tuple[str, Tensor]:
    known = (tensors.pixels.name, tensors.image.name)
    for name in inputs:
        if name not in known:
            raise ProtocolError(
                f"unknown input {name!r}; this model takes {known[0]!r} or {known[1]!r}"
            )
    if len(inputs) != 1:
        raise ProtocolError(
            f"send exactly one input, {known[0]!r} (pixels) or {known[1]!r} (image files); got "
            f"{len(inputs)}"
        )
    return next(iter(inputs.items()))


def _batch_size(name: str, count: int, service: Service) -> None:
    if not 1 <= count <= service.max_batch:
        raise ProtocolError(
            f"input {name!r}: {count} images; send 1 to {service.max_batch} in one request",
            "too_many_images" if count else "no_image",
        )


def _pixel_batch(service: Service, spec: TensorSpec, tensor: Tensor) -> np.ndarray:
    """The pixel tensor as the model's float32 input: FP32 as it is, UINT8 scaled."""
    if not isinstance(tensor, np.ndarray) or tensor.dtype not in (np.float32, np.uint8):
        given = "BYTES" if not isinstance(tensor, np.ndarray) else _datatype(tensor.dtype)
        raise ProtocolError(
            f"input {spec.name!r}: datatype {given} is not accepted; send FP32 (the model's "
            "input) or UINT8 (0–255 pixels)"
        )
    per_image = spec.shape[1:]
    if tensor.ndim != len(spec.shape) or tensor.shape[1:] != per_image:
        raise ProtocolError(
            f"input {spec.name!r}: shape {list(tensor.shape)} does not match the model's "
            f"{list(spec.shape)} (-1: the number of images)"
        )
    _batch_size(spec.name, tensor.shape[0], service)
    if tensor.dtype == np.uint8:
        return scale(tensor, service.classifier.pixel_range)
    if not np.isfinite(tensor).all():
        raise ProtocolError(f"input {spec.name!r}: FP32 data holds NaN or infinity")
    return tensor


async def _decoded_batch(service: Service, name: str, tensor: Tensor) -> np.ndarray:
    """Encoded images decoded and preprocessed by :meth:`Service.pixels` (``/predict``'s)."""
    if not isinstance(tensor, list):
        raise ProtocolError(
            f"input {name!r}: datatype {_datatype(tensor.dtype)} is not accepted; send BYTES "
            "(encoded image files), shape [number of images]"
        )
    _batch_size(name, len(tensor), service)
    images = [(f"{name}[{i}]", data) for i, data in enumerate(tensor)]
    try:
        async with service.decoding:
            return await asyncio.to_thread(service.pixels, images)
    except RequestError as exc:
        raise ProtocolError(str(exc), exc.reason) from None


def _datatype(dtype: np.dtype) -> str:
    for name, known in NUMPY_TYPES.items():
        if known == dtype:
            return name
    return str(dtype)


def _output(classifier: Classifier, request: OutputRequest, rows: Rows) -> OutputTensor:
    if request.name == OOD_OUTPUT_NAME:
        scores = np.asarray(rows.scores, dtype=np.float32)
        return OutputTensor(request.name, "FP32", scores.shape, scores)
    probabilities = np.asarray(rows.probabilities, dtype=np.float32)
    if request.classification is None:
        return OutputTensor(request.name, "FP32", probabilities.shape, probabilities)
    classified = _classifications(classifier, probabilities, request.classification)
    return OutputTensor(request.name, "BYTES", *classified)


def _classifications(
    classifier: Classifier, rows: np.ndarray, count: int
) -> tuple[tuple[int, ...], np.ndarray]:
    """Triton's classification extension: the top ``count`` of each row as
    ``"value:index:label"`` (value as C++ ``std::to_string`` writes a float: six decimals)."""
    labels = classifier.class_names or tuple(str(i) for i in range(rows.shape[1]))
    k = min(count, rows.shape[1])
    best = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(rows, best, axis=1)
    strings = np.empty(best.shape, dtype=object)
    for (i, j), index in np.ndenumerate(best):
        strings[i, j] = f"{values[i, j]:f}:{index}:{labels[index]}".encode()
    return strings.shape, strings


def output_data(tensor: OutputTensor) -> list[Any]:
    """An output's values for JSON: a flat row-major list (BYTES as text)."""
    if tensor.datatype == "BYTES":
        return [item.decode() for item in tensor.array.ravel()]
    return tensor.array.ravel().tolist()


def output_wire(tensor: OutputTensor) -> bytes:
    """An output's values as binary data (the binary tensor data extension)."""
    if tensor.datatype == "BYTES":
        return bytes_tensor_to_wire(list(tensor.array.ravel()))
    return np.ascontiguousarray(tensor.array, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()
