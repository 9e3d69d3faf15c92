"""The Open Inference Protocol over gRPC for ``cnnforge serve --grpc-port``: Triton's and
KServe's ``inference.GRPCInferenceService`` on a port of its own, in the same process and asyncio
loop as the HTTP routes, with the same model, batcher, token and metrics.

The messages are the generated modules ``tritonclient[grpc]`` ships (``service_pb2``): the
protocol's own ``grpc_service.proto``, compiled against the grpcio and protobuf that package
pins, so server and clients read the same fields. Seven calls are answered: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer and RepositoryIndex; any other
is gRPC's own UNIMPLEMENTED. What a request may be is :mod:`cnnforge.deploy.v2_protocol`'s, as
for the REST routes; its refusals map to status codes here (:func:`_status_of`).

With a token, every call but ServerLive and ServerReady (the health checks, as ``/health``) needs
the metadata ``authorization: Bearer TOKEN``, else UNAUTHENTICATED. Each call is counted in the
server's metrics under the route ``grpc:METHOD`` with its status code's name.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.batching import Overloaded, Stopped
from cnnforge.deploy.serve_requests import overloaded
from cnnforge.deploy.v2_protocol import (
    VERSION,
    ProtocolError,
    Tensor,
    check_shape,
    infer,
    model_spec,
    output_request,
    output_wire,
    server_metadata,
    tensor_from_bytes,
    tensor_from_json,
)

if TYPE_CHECKING:
    from cnnforge.deploy.serve_service import Service

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "RepositoryIndex",
)
HEALTH = frozenset({"ServerLive", "ServerReady"})  # answered without a token, as /health
GRPC_EXTRA = "pip install 'cnnforge[grpc]'"
# seconds the calls in flight get to finish once the server stops (uvicorn's own grace)
GRACE_S = 30.0
# InferTensorContents' field for each datatype (typed contents, instead of raw bytes)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def require_grpc() -> None:
    """One line naming the extra when grpcio or Triton's generated protocol modules cannot be
    imported (not installed, or a grpcio/protobuf older than they were generated for)."""
    for module in ("grpc", "tritonclient.grpc.service_pb2"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or tritonclient's RuntimeError on a bad grpcio
            raise CnnforgeError(
                f"the gRPC endpoint needs {module}, which does not import ({_first_line(exc)}): "
                f"{GRPC_EXTRA}"
            ) from None


def check_port(host: str, port: int) -> None:
    """One line, before anything is loaded or listens, when ``host:port`` is taken (gRPC binds
    it later, in the server's event loop, where a failure would end in uvicorn's traceback)."""
    if port == 0:
        return
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise CnnforgeError(_cannot_listen(host, port, exc.strerror or str(exc))) from None


class GrpcEndpoint:
    """The gRPC server of one app: started and stopped by the app's lifespan, in uvicorn's loop.

    ``port`` 0 takes an ephemeral port; :attr:`port` is the one bound once started."""

    def __init__(
        self,
        service: Service,
        host: str,
        port: int,
        *,
        token: str | None = None,
        model_name: str | None = None,
    ) -> None:
        """``service``'s model served as ``model_name`` (by default its file's stem); call
        :func:`require_grpc` first for a one-line error where grpc is missing."""
        self.host, self.port = host, port
        self.calls = _Calls(service, model_name or Path(service.classifier.model).stem, token)
        self._server: Any = None
        self._stopping: asyncio.Future | None = None

    async def start(self) -> None:
        import grpc

        options = [
            # SO_REUSEPORT (grpc's default on Linux) would let a second server share the port
            ("grpc.so_reuseport", 0),
            # a request holds at most a request body's bytes, as over HTTP
            ("grpc.max_receive_message_length", self.calls.service.max_body),
        ]
        # beyond the queue's worth of calls, RESOURCE_EXHAUSTED at once: received messages
        # stay bounded (max_queue × max_body bytes), as HTTP bodies are
        server = grpc.aio.server(
            options=options, maximum_concurrent_rpcs=self.calls.service.max_queue
        )
        server.add_generic_rpc_handlers((self.calls.handler(),))
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise CnnforgeError(_cannot_listen(self.host, self.port, _first_line(exc))) from None
        await server.start()
        self._server = server
        # uvicorn's logger, so the line shows beside "Uvicorn running on ..."
        logging.getLogger("uvicorn.error").info(
            "gRPC on %s:%d (inference.GRPCInferenceService)", self.host, self.port
        )

    def stop_accepting(self) -> None:
        """Start stopping: no new call is taken; those in flight go on for up to ``GRACE_S``
        seconds. Called as the HTTP side stops listening, so both stop taking work together."""
        if self._server is not None and self._stopping is None:
            self._stopping = asyncio.ensure_future(self._server.stop(GRACE_S))

    async def stop(self) -> None:
        """Stop and wait until the calls in flight are answered (before the batcher stops)."""
        self.stop_accepting()
        if self._stopping is not None:
            await self._stopping


class _Refused(Exception):
    """A call refused with a status code, a metrics reason and one line."""

    def __init__(self, code: Any, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


class _Calls:
    """The seven calls, each wrapped with the token check, the metrics and the status codes."""

    def __init__(self, service: Service, name: str, token: str | None) -> None:
        from tritonclient.grpc import service_pb2

        self.service, self.name, self.pb = service, name, service_pb2
        self.token = token.encode() if token else None

    def handler(self) -> Any:
        import grpc

        handlers = {
            method: grpc.unary_unary_rpc_method_handler(
                self._wrapped(method),
                request_deserializer=getattr(self.pb, f"{method}Request").FromString,
                response_serializer=getattr(self.pb, f"{method}Response").SerializeToString,
            )
            for method in METHODS
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _wrapped(self, method: str) -> Callable[[Any, Any], Awaitable[Any]]:
        import grpc

        answer = getattr(self, method)
        route, metrics = f"grpc:{method}", self.service.metrics

        async def call(request: Any, context: Any) -> Any:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                if method not in HEALTH:
                    self._authorize(context)
                return await answer(request)
            except asyncio.CancelledError:  # the client left or its deadline passed
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                refused = _status_of(exc)
                code = refused.code
                metrics.errors.labels(refused.reason).inc()
                await context.abort(code, str(refused))
            finally:
                metrics.latency.labels(route).observe(time.perf_counter() - start)
                metrics.requests.labels(route, code.name).inc()

        return call

    def _authorize(self, context: Any) -> None:
        import grpc

        if self.token is None:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, value = given.partition(" ")
        # compare_digest takes as long whatever the token's first wrong byte is
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), self.token
        ):
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "unauthorized",
                "missing or wrong token; send the metadata authorization: Bearer TOKEN",
            )

    def _model(self, name: str, version: str = "") -> None:
        """NOT_FOUND unless ``name`` (and ``version``, if given) is the model served."""
        import grpc

        if name != self.name or version not in ("", VERSION):
            what = f"model {name!r}" + (f" version {version!r}" if version else "")
            raise _Refused(
                grpc.StatusCode.NOT_FOUND,
                "unknown_model",
                f"{what} is not served here; this server serves {self.name!r} version {VERSION}",
            )

    async def ServerLive(self, request: Any) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any) -> Any:
        return self.pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any) -> Any:
        self._model(request.name, request.version)
        return self.pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any) -> Any:
        return self.pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request: Any) -> Any:
        self._model(request.name, request.version)
        spec = model_spec(self.service, self.name)
        tensor = self.pb.ModelMetadataResponse.TensorMetadata
        return self.pb.ModelMetadataResponse(
            name=spec.name,
            versions=spec.versions,
            platform=spec.platform,
            inputs=[tensor(**t.as_dict()) for t in spec.inputs],
            outputs=[tensor(**t.as_dict()) for t in spec.outputs],
        )

    async def RepositoryIndex(self, request: Any) -> Any:
        index = self.pb.RepositoryIndexResponse
        return index(models=[index.ModelIndex(name=self.name, version=VERSION, state="READY")])

    async def ModelInfer(self, request: Any) -> Any:
        self._model(request.model_name, request.model_version)
        outputs = [
            output_request(o.name, {k: _parameter(v) for k, v in o.parameters.items()})
            for o in request.outputs
        ]
        results = await infer(self.service, _inputs(request), outputs)
        answer = self.pb.ModelInferResponse(
            model_name=self.name, model_version=VERSION, id=request.id
        )
        for result in results:  # raw_output_contents, as Triton answers
            answer.outputs.add(name=result.name, datatype=result.datatype, shape=result.shape)
            answer.raw_output_contents.append(output_wire(result))
        return answer


def _inputs(request: Any) -> dict[str, Tensor]:
    """A ModelInferRequest's tensors: from ``raw_input_contents`` (one per input, in order, as
    Triton's clients send them) or from each input's typed ``contents``."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per "
            "input, in order, or typed contents for every input"
        )
    tensors: dict[str, Tensor] = {}
    for i, given in enumerate(request.inputs):
        if given.name in tensors:
            raise ProtocolError(f"input {given.name!r} is given twice")
        shape = list(given.shape)
        if raw:
            tensors[given.name] = tensor_from_bytes(given.name, given.datatype, shape, raw[i])
        else:
            tensors[given.name] = _typed(given.name, given.datatype, shape, given.contents)
    return tensors


def _typed(name: str, datatype: str, shape: list[int], contents: Any) -> Tensor:
    """A tensor from its typed contents (the field its datatype uses)."""
    field = CONTENTS.get(datatype)
    if field is None:
        raise ProtocolError(
            f"input {name!r}: datatype {datatype!r} has no typed contents; send it as "
            f"raw_input_contents, or one of {', '.join(CONTENTS)}"
        )
    values = getattr(contents, field)
    if datatype != "BYTES":
        return tensor_from_json(name, datatype, shape, np.asarray(values))
    if len(values) != math.prod(check_shape(name, shape)):
        raise ProtocolError(
            f"input {name!r}: {len(values)} BYTES elements for shape {shape}; send one "
            "bytes_contents element per image"
        )
    return list(values)


def _parameter(value: Any) -> Any:
    """An InferParameter's value (bool, int, str or float, whichever it holds)."""
    which = value.WhichOneof("parameter_choice")
    return getattr(value, which) if which else None


def _status_of(exc: Exception) -> _Refused:
    """The status code, metrics reason and one line a failed call answers with."""
    import grpc

    codes = grpc.StatusCode
    if isinstance(exc, _Refused):
        return exc
    if isinstance(exc, ProtocolError):
        return _Refused(codes.INVALID_ARGUMENT, exc.reason, str(exc))
    if isinstance(exc, Overloaded):
        refusal = overloaded()
        return _Refused(codes.UNAVAILABLE, refusal.reason, str(refusal))
    if isinstance(exc, Stopped):
        return _Refused(codes.UNAVAILABLE, "stopped", str(exc))
    # onnxruntime, a bug: logged with its traceback, one line to the client
    log.exception("gRPC call failed")
    return _Refused(codes.INTERNAL, "internal", "internal error; see the server's log")


def _cannot_listen(host: str, port: int, why: str) -> str:
    return f"cannot listen on {host}:{port} for gRPC ({why}); choose another --grpc-port or --host"


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(";. ")
