"""``cnnforge serve``: an exported model behind HTTP, batched dynamically, safe with bad input.

Starlette under uvicorn. ``POST /predict`` takes one or several images (multipart form files,
or the raw bytes of one image) and answers their top-k labels as JSON; ``GET /health``,
``GET /metadata`` (from the model's own cnnforge metadata), ``GET /metrics`` (Prometheus text)
and ``GET /openapi.json``; the Open Inference Protocol's REST routes (``/v2/...``,
:mod:`cnnforge.deploy.serve_v2`) beside them, the model named by its file's stem. Images are preprocessed exactly as ``cnnforge predict`` does:
decoded (EXIF upright), then :meth:`Classifier.pixels`. Concurrent requests share onnxruntime
calls through :class:`cnnforge.deploy.batching.Batcher`.

    from cnnforge.deploy.server import create_app, serve

    serve("model.onnx", port=8000, max_batch=32, max_wait_ms=2)

Bad input is a 4xx with ``{"error": "one line"}``; the server goes on. With a token every route
but ``/health`` (and ``/v2/health/live``, ``/v2/health/ready``) needs ``Authorization: Bearer
TOKEN`` (compared in constant time). With ``grpc_address`` the protocol's gRPC service runs
beside the routes, in the same loop (:mod:`cnnforge.deploy.serve_grpc`). SIGTERM or Ctrl-C stops
accepting (HTTP and gRPC), answers what is in flight, then returns (exit status 0).

This module is the app: middleware, routes, the uvicorn server. What one request may be (body,
limits, content type, ``top_k``) is :mod:`cnnforge.deploy.serve_requests`, the model with its
batcher and metrics :mod:`cnnforge.deploy.serve_service`, the OpenAPI description
:mod:`cnnforge.deploy.serve_openapi`; their public names are importable from here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import ipaddress
import logging
import signal
import socket
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.deploy.batching import Overloaded
from cnnforge.deploy.serve_grpc import GrpcEndpoint, check_port, require_grpc
from cnnforge.deploy.serve_openapi import openapi_document
from cnnforge.deploy.serve_requests import (
    RAW_TYPES,
    RETRY_AFTER_S,
    TOP_K_DIGITS,
    RequestError,
    content_kind,
    overloaded,
    read_body,
    request_images,
    top_k_of,
)
from cnnforge.deploy.serve_service import (
    DECODERS,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_WAIT_MS,
    Metrics,
    Service,
)
from cnnforge.deploy.serve_v2 import PUBLIC, metrics_route, v2_routes

__all__ = [
    "DECODERS",
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_WAIT_MS",
    "GRACEFUL_TIMEOUT_S",
    "RAW_TYPES",
    "RETRY_AFTER_S",
    "ROUTES",
    "TOKEN_ENV",
    "TOP_K_DIGITS",
    "Metrics",
    "RequestError",
    "Service",
    "create_app",
    "listen",
    "openapi_document",
    "serve",
    "server",
    "warn_if_open",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "CNNFORGE_SERVE_TOKEN"
GRACEFUL_TIMEOUT_S = 30
ROUTES = ("/predict", "/health", "/metadata", "/metrics", "/openapi.json")
_PUBLIC = ("/health", *PUBLIC)  # no token needed


def _require_serve() -> None:
    """One line naming the extra when the serving packages are not installed."""
    for module in ("starlette", "uvicorn", "prometheus_client"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise CnnforgeError(
                f"serving needs {module}, which is not installed: pip install 'cnnforge[serve]'"
            ) from None


class _Front:
    """ASGI middleware, one layer for two jobs (each layer costs every request a call and a
    closure): every route but the health ones needs ``Authorization: Bearer TOKEN``, and every
    response, refusals included, is counted by route and status and timed."""

    def __init__(self, app: Any, token: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.token = token.encode() if token else None
        # the series' children bound once each, not looked up by label on every request
        # (routes are a fixed few: /v2 model paths are counted by their template)
        self.latency: dict[str, Any] = {}
        self.counted: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else metrics_route(path) or "other"
        status = 500
        start = time.perf_counter()

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if path in _PUBLIC or self._allowed(scope):
                await self.app(scope, receive, sending)
            else:
                self.metrics.errors.labels("unauthorized").inc()
                await _unauthorized()(scope, receive, sending)
        finally:
            self._latency(route).observe(time.perf_counter() - start)
            self._requests(route, status).inc()

    def _requests(self, route: str, status: int) -> Any:
        counter = self.counted.get((route, status))
        if counter is None:
            counter = self.counted[route, status] = self.metrics.requests.labels(route, str(status))
        return counter

    def _latency(self, route: str) -> Any:
        histogram = self.latency.get(route)
        if histogram is None:
            histogram = self.latency[route] = self.metrics.latency.labels(route)
        return histogram

    def _allowed(self, scope: dict) -> bool:
        if self.token is None:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        # compare_digest takes as long whatever the token's first wrong byte is
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)


def _unauthorized() -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(
        {"error": "missing or wrong token; send the header Authorization: Bearer TOKEN"},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def create_app(
    model: Path | str,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_queue: int = DEFAULT_MAX_QUEUE,
    threads: int | None = None,
    token: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    provider: str = "cpu",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decoders: int = DECODERS,
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
    reject_unknown: bool = False,
    min_confidence: float | None = None,
    name: str | None = None,
    grpc_address: tuple[str, int] | None = None,
) -> Any:
    """The ASGI app (Starlette) serving ``model``; the model is loaded now, so a bad file fails
    here, before anything listens. A request may carry at most ``max_batch`` images of at most
    ``max_pixels`` pixels each; at most ``decoders`` images are decoded at once. A body that
    goes ``body_timeout`` seconds without a byte is a 408. ``reject_unknown`` and
    ``min_confidence``: answer ``unknown`` below a confidence, as :class:`Classifier` does.
    ``name``: the model's name in the ``/v2`` routes and over gRPC (default: the file's stem).
    ``grpc_address`` (host, port): also serve the protocol's gRPC service there, started and
    stopped with the app (port 0: an ephemeral one, ``app.state.grpc.port`` once started)."""
    _require_serve()
    if grpc_address is not None:
        require_grpc()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    service = Service(
        model,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        threads=threads,
        max_body=max_body,
        provider=provider,
        max_pixels=max_pixels,
        decoders=decoders,
        body_timeout=body_timeout,
        reject_unknown=reject_unknown,
        min_confidence=min_confidence,
    )
    name = name or Path(model).stem  # the model's name in the protocol, REST and gRPC
    grpc = (
        GrpcEndpoint(service, *grpc_address, token=token, model_name=name) if grpc_address else None
    )

    async def predict_route(request: Any) -> Any:
        try:
            top_k = top_k_of(request)
            if service.full:  # refused before the body is read
                raise overloaded()
            kind = content_kind(request)
            body = await read_body(request, service)
            try:
                if service.full:  # it filled while the body came in
                    raise overloaded()
                service.arriving += 1
                try:
                    images = await request_images(request, kind, body, service.max_batch)
                    if service.decodes_inline(images):
                        batch = service.pixels(images)
                    else:
                        async with service.decoding:
                            batch = await asyncio.to_thread(service.pixels, images)
                finally:
                    service.arriving -= 1
            finally:
                service.release(len(body))
            try:
                rows = await service.batcher.submit(batch)
            except Overloaded:
                raise overloaded() from None
            names = [name for name, _ in images]
            return JSONResponse({"predictions": service.answer(names, rows, top_k)})
        except RequestError as exc:
            service.metrics.errors.labels(exc.reason).inc()
            return JSONResponse({"error": str(exc)}, exc.status, headers=exc.headers)
        except Exception:  # onnxruntime, Pillow, a bug: logged, counted, still one JSON line
            log.exception("/predict failed")
            service.metrics.errors.labels("internal").inc()
            return JSONResponse({"error": "internal error; see the server's log"}, 500)

    async def health(request: Any) -> Any:
        return JSONResponse({"status": "ok"})

    async def metadata(request: Any) -> Any:
        return JSONResponse(service.metadata())

    async def metrics(request: Any) -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Any) -> Any:
        return JSONResponse(openapi_document(service, name))

    async def http_error(request: Any, exc: Any) -> Any:  # unknown route, wrong method
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        service.batcher.start()
        if grpc is not None:
            await grpc.start()
        yield
        if grpc is not None:
            await grpc.stop()  # its calls in flight answered, as uvicorn's were
        await service.batcher.stop()  # after uvicorn answered what was in flight

    app = Starlette(
        routes=[
            Route("/predict", predict_route, methods=["POST"]),
            Route("/health", health),
            Route("/metadata", metadata),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi),
            *v2_routes(service, name),
        ],
        middleware=[Middleware(_Front, token=token, metrics=service.metrics)],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )
    app.state.service, app.state.grpc = service, grpc
    return app


def server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> Any:
    """A uvicorn server for ``app`` (call ``.run()``; set ``.should_exit`` to stop it). Unlike
    uvicorn's own, a signal ends it with a drained, clean return (exit status 0) instead of
    raising the signal again after the shutdown."""
    _require_serve()
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # the gRPC port stops taking calls with the HTTP one, not after HTTP's drain
            grpc = getattr(getattr(app, "state", None), "grpc", None)
            if grpc is not None:
                grpc.stop_accepting()
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_TIMEOUT_S,
        lifespan="on",
    )
    return Server(config)


def serve(
    model: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    grpc_port: int | None = None,
    **options: Any,
) -> None:
    """Serve ``model`` until SIGTERM or Ctrl-C, then drain and return. ``grpc_port``: also serve
    the protocol over gRPC on ``host:grpc_port``. ``options`` are :func:`create_app`'s."""
    warn_if_open(host, options.get("token"))
    if grpc_port is not None:
        if grpc_port == port != 0:
            raise CnnforgeError(
                f"--grpc-port {grpc_port} is --port too; give gRPC a port of its own"
            )
        require_grpc()
        check_port(host, grpc_port)
        options["grpc_address"] = (host, grpc_port)
    app = create_app(model, **options)
    listening = listen(host, port)
    server(app, host=host, port=port, log_level=log_level).run(sockets=[listening])


def warn_if_open(host: str, token: str | None, stacklevel: int = 3) -> None:
    """A warning when ``host`` is reachable from other machines and no token is set."""
    if token is None and not _is_loopback(host):
        warnings.warn(
            f"serving on {host} without a token: anyone who can reach it can use it; set "
            f"--token or {TOKEN_ENV}",
            CnnforgeWarning,
            stacklevel=stacklevel,
        )


def listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A socket bound to ``host:port`` (before uvicorn starts, so a port in use is one line);
    ``reuse_port``: with ``SO_REUSEPORT``, so that several processes' sockets share the port."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listening = socket.socket(family, kind)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listening.bind(address)
    except OSError as exc:
        raise CnnforgeError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or "
            "--host"
        ) from None
    return listening


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
