"""The Open Inference Protocol's HTTP/REST body format, without a web framework: the JSON
request (with Triton's binary tensor data extension: the JSON header's length in
``Inference-Header-Content-Length``, binary inputs after it, in order) read into tensors, and
an answer's body built from the outputs (binary outputs after the JSON header likewise).
The routes are :mod:`cnnforge.deploy.serve_v2`; tensors and inference, :mod:`.v2_protocol`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cnnforge.deploy.v2_protocol import (
    DATATYPES,
    VERSION,
    OutputRequest,
    OutputTensor,
    ProtocolError,
    Tensor,
    output_data,
    output_request,
    output_wire,
    tensor_from_bytes,
    tensor_from_json,
)

try:  # several times faster than json on large tensors; optional
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

HEADER_LENGTH = "Inference-Header-Content-Length"


def loads(data: bytes | memoryview) -> Any:
    """JSON text → Python (orjson where installed), a :class:`ProtocolError` if malformed."""
    try:
        if _orjson is not None:
            return _orjson.loads(data)
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(
            f"the request's JSON is malformed ({str(exc)[:120]})", "bad_json"
        ) from None


def dumps(value: Any) -> bytes:
    """Python → compact JSON bytes (orjson where installed)."""
    if _orjson is not None:
        return _orjson.dumps(value)
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


@dataclass
class RestRequest:
    """An inference request read from an HTTP body."""

    id: str | None
    inputs: dict[str, Tensor]
    outputs: list[OutputRequest]  # empty: every output
    binary_output: bool  # Triton's ``binary_data_output``: the default for outputs


def parse_rest_request(body: bytes, header_length: str | None) -> RestRequest:
    """An HTTP/REST inference request: its JSON (the first ``header_length`` bytes of
    ``body`` with the binary tensor data extension, else all of it), its inputs (binary ones
    read in place from the rest of ``body``, in order) and the outputs asked for."""
    split = _header_length(header_length, len(body))
    view = memoryview(body)
    request = loads(view[:split])
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ProtocolError('the request must be a JSON object with a list of "inputs"', "bad_json")
    inputs: dict[str, Tensor] = {}
    offset = split
    for item in request["inputs"]:
        name, datatype, shape, parameters = _input_fields(item)
        size = parameters.get("binary_data_size")
        if size is None:
            if "data" not in item:
                raise ProtocolError(f'input {name!r} has no "data" and no binary_data_size')
            inputs[name] = tensor_from_json(name, datatype, shape, item["data"])
            continue
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
            or offset + size > len(body)
        ):
            raise ProtocolError(
                f"input {name!r}: binary_data_size {size!r} is past the {len(body) - split:,} "
                "bytes of binary data after the JSON header"
            )
        inputs[name] = tensor_from_bytes(name, datatype, shape, view[offset : offset + size])
        offset += size
    if offset != len(body):
        raise ProtocolError(
            f"{len(body) - offset:,} bytes after the JSON header belong to no input; give each "
            "binary input its binary_data_size"
        )
    binary = _rest_flag(request, "binary_data_output")
    request_id = request.get("id")
    return RestRequest(
        request_id if isinstance(request_id, str) else None,
        inputs,
        _rest_outputs(request, binary),
        binary,
    )


def _header_length(raw: str | None, body_size: int) -> int:
    if raw is None:
        return body_size
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) > body_size:
        raise ProtocolError(
            f"{HEADER_LENGTH} must be the JSON header's length in bytes, at most the body's "
            f"{body_size:,}; got {raw[:20]!r}"
        )
    return int(raw)


def _input_fields(item: Any) -> tuple[str, str, Any, dict[str, Any]]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ProtocolError('each input must be a JSON object with a "name"')
    name, datatype = item["name"], item.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(
            f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}"
        )
    if "shape" not in item:
        raise ProtocolError(f'input {name!r} has no "shape"')
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"input {name!r}: parameters must be a JSON object")
    return name, datatype, item["shape"], parameters


def _rest_flag(request: dict[str, Any], name: str) -> bool:
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("the request's parameters must be a JSON object")
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"the request's {name} must be true or false")
    return value


def _rest_outputs(request: dict[str, Any], binary: bool) -> list[OutputRequest]:
    outputs = request.get("outputs")
    if outputs is None:
        return []
    if not isinstance(outputs, list):
        raise ProtocolError('"outputs" must be a list of objects with a "name"')
    wanted = []
    for item in outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError('each output must be a JSON object with a "name"')
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ProtocolError(f"output {item['name']!r}: parameters must be a JSON object")
        wanted.append(output_request(item["name"], parameters, binary))
    return wanted


def rest_response(
    model: str, request: RestRequest, results: Sequence[OutputTensor]
) -> tuple[bytes, int | None]:
    """An inference answer's HTTP body, and the length of its JSON header where outputs
    travel as binary data after it (None: the body is all JSON)."""
    asked = request.outputs or [OutputRequest(r.name, None, request.binary_output) for r in results]
    outputs, binary = [], []
    for wanted, result in zip(asked, results, strict=True):
        answer: dict[str, Any] = {
            "name": result.name,
            "datatype": result.datatype,
            "shape": list(result.shape),
        }
        if wanted.binary:
            binary.append(output_wire(result))
            answer["parameters"] = {"binary_data_size": len(binary[-1])}
        else:
            answer["data"] = output_data(result)
        outputs.append(answer)
    head: dict[str, Any] = {"model_name": model, "model_version": VERSION}
    if request.id is not None:
        head["id"] = request.id
    header = dumps(head | {"outputs": outputs})
    if not binary:
        return header, None
    return b"".join([header, *binary]), len(header)
