"""The Open Inference Protocol's REST routes (``/v2/...``) in ``cnnforge serve``: the same
process, batcher, token, body limits, queue and metrics as ``/predict``; the protocol itself is
:mod:`cnnforge.deploy.v2_protocol`, its REST body format :mod:`cnnforge.deploy.v2_rest`.

Errors are ``{"error": "one line"}``: 400 for a request the protocol refuses, 404 for another
model's name or version, and ``/predict``'s 401, 408, 413 and 503 for the shared limits.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.batching import Overloaded
from cnnforge.deploy.serve_requests import RequestError, overloaded, read_body
from cnnforge.deploy.v2_protocol import VERSION, ProtocolError, infer, model_spec, server_metadata
from cnnforge.deploy.v2_rest import HEADER_LENGTH, parse_rest_request, rest_response

if TYPE_CHECKING:
    from cnnforge.deploy.serve_service import Service

log = logging.getLogger(__name__)

MODEL = "/v2/models/{model}"
MODEL_VERSION = "/v2/models/{model}/versions/{version}"
# routes without a token, as /health: a load balancer's or Kubernetes' probes
PUBLIC = ("/v2/health/live", "/v2/health/ready")
_MODEL_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?(/ready|/infer)?$")


def metrics_route(path: str) -> str | None:
    """The route a ``/v2`` path is counted under in the metrics (the model's name replaced,
    so a client cannot add series at will), None for other paths."""
    if path in ("/v2", "/v2/repository/index", *PUBLIC):
        return path
    match = _MODEL_PATH.match(path)
    if match is None:
        return None
    return (MODEL_VERSION if match.group(1) else MODEL) + (match.group(2) or "")


def v2_routes(service: Service, name: str) -> list[Any]:
    """The protocol's routes for ``service``'s model, served as ``name``."""
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    if not name or "/" in name or len(name) > 200:
        raise CnnforgeError(
            f"model name {name[:80]!r} cannot be a URL path segment; give --name without '/'"
        )
    spec = model_spec(service, name).as_dict()

    def error(status: int, reason: str, message: str, headers: dict | None = None) -> Any:
        service.metrics.errors.labels(reason).inc()
        return JSONResponse({"error": message}, status, headers=headers)

    def unknown(request: Any) -> Any | None:
        """A 404 where the path names another model or version, else None."""
        model, version = request.path_params["model"], request.path_params.get("version")
        if model != name:
            return error(
                404, "unknown_model", f"unknown model {model[:80]!r}; this server serves {name!r}"
            )
        if version not in (None, VERSION):
            return error(
                404,
                "unknown_model",
                f"model {name!r} has no version {version[:20]!r}; it has {VERSION!r}",
            )
        return None

    async def server(request: Any) -> Any:
        return JSONResponse(server_metadata())

    async def live(request: Any) -> Any:
        return JSONResponse({"live": True})

    async def ready(request: Any) -> Any:
        return JSONResponse({"ready": True})

    async def metadata(request: Any) -> Any:
        return unknown(request) or JSONResponse(spec)

    async def model_ready(request: Any) -> Any:
        return unknown(request) or JSONResponse({"name": name, "ready": True})

    async def index(request: Any) -> Any:
        return JSONResponse([{"name": name, "version": VERSION, "state": "READY"}])

    async def infer_route(request: Any) -> Any:
        if (refused := unknown(request)) is not None:
            return refused
        try:
            return await _infer(request, service, name, Response)
        except (ProtocolError, RequestError) as exc:
            status = getattr(exc, "status", 400)
            return error(status, exc.reason, str(exc), getattr(exc, "headers", None))
        except Overloaded:
            exc = overloaded()
            return error(exc.status, exc.reason, str(exc), exc.headers)
        except Exception:  # onnxruntime, a bug: logged, counted, still one JSON line
            log.exception("%s failed", request.url.path)
            return error(500, "internal", "internal error; see the server's log")

    routes = [
        Route("/v2", server),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/repository/index", index, methods=["POST"]),
    ]
    for base in (MODEL, MODEL_VERSION):
        routes += [
            Route(base, metadata),
            Route(f"{base}/ready", model_ready),
            Route(f"{base}/infer", infer_route, methods=["POST"]),
        ]
    return routes


async def _infer(request: Any, service: Service, name: str, response: Any) -> Any:
    """One inference request: its body read within the server's limits, parsed (the JSON
    header once, binary inputs in place), run, and answered (binary outputs after the JSON)."""
    if service.full:  # refused before the body is read, as /predict does
        raise overloaded()
    body = await read_body(request, service)
    try:
        parsed = parse_rest_request(body, request.headers.get(HEADER_LENGTH))
    finally:
        service.release(len(body))
    results = await infer(service, parsed.inputs, parsed.outputs)
    content, header_length = rest_response(name, parsed, results)
    if header_length is None:
        return response(content, media_type="application/json")
    return response(
        content,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
    )
