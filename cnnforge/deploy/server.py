"""``cnnforge serve``: an exported model behind HTTP, batched dynamically, safe with bad input.

Starlette under uvicorn. ``POST /predict`` takes one or several images (multipart form files,
or the raw bytes of one image) and answers their top-k labels as JSON; ``GET /health``,
``GET /metadata`` (from the model's own cnnforge metadata), ``GET /metrics`` (Prometheus text)
and ``GET /openapi.json``. Images are preprocessed exactly as ``cnnforge predict`` does:
decoded (EXIF upright), then :meth:`Classifier.pixels`. Concurrent requests share onnxruntime
calls through :class:`cnnforge.deploy.batching.Batcher`.

    from cnnforge.deploy.server import create_app, serve

    serve("model.onnx", port=8000, max_batch=32, max_wait_ms=2)

Bad input is a 4xx with ``{"error": "one line"}``; the server goes on. With a token every route
but ``/health`` needs ``Authorization: Bearer TOKEN`` (compared in constant time). SIGTERM or
Ctrl-C stops accepting, answers what is in flight, then returns (exit status 0).
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

import numpy as np

from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.core.imagefiles import UnsupportedImageFormat
from cnnforge.deploy.batching import Batcher, Overloaded
from cnnforge.deploy.images import open_image
from cnnforge.deploy.predict import Classifier

log = logging.getLogger(__name__)

TOKEN_ENV = "CNNFORGE_SERVE_TOKEN"
DEFAULT_MAX_BODY = 16 * 2**20  # bytes of one request body; documented in docs/deployment.md
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_WAIT_MS = 2.0
DEFAULT_MAX_QUEUE = 256  # requests read, decoded or waiting for a batch; beyond it a 503
# pixels of one image (4096×4096), well below Pillow's 89 M: a decoded RGBA image ≤ 64 MiB
DEFAULT_MAX_PIXELS = 4096 * 4096
DECODERS = 2  # images decoded at once, whatever the number of requests
# seconds a request body may go without a byte (nginx's client_body_timeout is 60 s); then 408
DEFAULT_BODY_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1
GRACEFUL_TIMEOUT_S = 30
TOP_K_DIGITS = 9  # top_k past the classes gives them all; longer numbers are refused
RAW_TYPES = ("application/octet-stream",)  # and every image/* type
ROUTES = ("/predict", "/health", "/metadata", "/metrics", "/openapi.json")


def _require_serve() -> None:
    """One line naming the extra when the serving packages are not installed."""
    for module in ("starlette", "uvicorn", "prometheus_client"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise CnnforgeError(
                f"serving needs {module}, which is not installed: pip install 'cnnforge[serve]'"
            ) from None


class RequestError(Exception):
    """A request the server refuses: its HTTP status, a metrics reason and one line."""

    def __init__(self, status: int, reason: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


class Metrics:
    """The server's Prometheus series, in a registry of its own (one per app)."""

    def __init__(self, max_batch: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        reg = {"registry": self.registry}
        self.requests = Counter(
            "cnnforge_requests", "HTTP requests answered", ["route", "status"], **reg
        )
        self.errors = Counter("cnnforge_errors", "Requests refused or failed", ["reason"], **reg)
        self.images = Counter("cnnforge_images", "Images classified", **reg)
        buckets = sorted({2**i for i in range(max_batch.bit_length())} | {max_batch})
        self.batch_size = Histogram(
            "cnnforge_batch_size", "Images per onnxruntime call", buckets=buckets, **reg
        )
        self.batch_seconds = Histogram(
            "cnnforge_batch_seconds", "Seconds per onnxruntime call", **reg
        )
        self.latency = Histogram(
            "cnnforge_request_seconds",
            "Request latency, from the first byte in to the last byte out",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            **reg,
        )
        self.queue = Gauge("cnnforge_queue_depth", "Requests waiting for a batch", **reg)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)


class _Observe:
    """ASGI middleware: counts every response by route and status, and times it."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500
        start = time.perf_counter()

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status)).inc()


class _Auth:
    """ASGI middleware: every route but /health needs ``Authorization: Bearer TOKEN``."""

    def __init__(self, app: Any, token: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.token = token.encode() if token else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.responses import JSONResponse

        if scope["type"] == "http" and scope["path"] != "/health" and not self._allowed(scope):
            self.metrics.errors.labels("unauthorized").inc()
            response = JSONResponse(
                {"error": "missing or wrong token; send the header Authorization: Bearer TOKEN"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _allowed(self, scope: dict) -> bool:
        if self.token is None:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        # compare_digest takes as long whatever the token's first wrong byte is
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)


class Service:
    """The model, its batcher and metrics: what the routes share."""

    def __init__(
        self,
        model: Path | str,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        threads: int | None,
        max_body: int,
        provider: str,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decoders: int = DECODERS,
        body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        if max_body < 1 or max_pixels < 1 or decoders < 1:
            raise CnnforgeError(
                f"max_body ({max_body}), max_pixels ({max_pixels}) and decoders ({decoders}) "
                "must be at least 1"
            )
        if not body_timeout > 0:
            raise CnnforgeError(f"body_timeout must be over 0 seconds, got {body_timeout}")
        self.classifier = Classifier(model, provider=provider, threads=threads)
        self.fixed_batch = _fixed_batch(self.classifier, max_batch)
        max_batch = min(max_batch, self.fixed_batch or max_batch)
        self.max_batch, self.max_body, self.max_queue = max_batch, max_body, max_queue
        self.max_pixels = max_pixels
        self.body_timeout = body_timeout
        self.arriving = 0  # /predict requests read and being decoded, not yet queued
        # bodies being received take no place in the queue (a stalled upload would hold it):
        # their bytes are counted instead, against the queue's worth of bodies
        self.receiving = 0
        self.body_bytes, self.max_body_bytes = 0, max_queue * max_body
        self.decoding = asyncio.Semaphore(decoders)  # bounds the decoded images in memory
        self.metrics = Metrics(max_batch)
        self.batcher = Batcher(
            self.run,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            on_batch=self.metrics.batch,
            arriving=lambda: self.arriving + self.receiving,
        )
        self.metrics.queue.set_function(lambda: self.batcher.depth)

    @property
    def full(self) -> bool:
        """Whether ``max_queue`` requests are decoding or waiting for a batch."""
        return self.batcher.depth + self.arriving >= self.max_queue

    def hold(self, size: int) -> None:
        """Count ``size`` more bytes of request bodies in memory; a 503 past ``max_queue`` ×
        ``max_body`` bytes."""
        if self.body_bytes + size > self.max_body_bytes:
            raise _overloaded()
        self.body_bytes += size

    def release(self, size: int) -> None:
        self.body_bytes -= size

    def run(self, batch: np.ndarray) -> np.ndarray:
        """One onnxruntime call (``max_batch`` is capped to a fixed batch size, which
        :meth:`Classifier.run` pads a smaller batch up to)."""
        return self.classifier.run(batch)

    def pixels(self, images: list[tuple[str, bytes]]) -> np.ndarray:
        """The images as one batch in the model's layout: each decoded (at most ``max_pixels``)
        and turned upright, then :meth:`Classifier.pixels`, as ``cnnforge predict`` does."""
        arrays = []
        for name, data in images:
            try:
                image, _ = open_image(data, self.max_pixels)
            except UnsupportedImageFormat as exc:
                raise RequestError(415, "image_format", f"{name}: {exc}") from None
            except CnnforgeError as exc:
                raise RequestError(422, "bad_image", f"{name}: {exc}") from None
            arrays.append(self.classifier.pixels(image))
        return self.classifier.batch(arrays)

    def answer(self, names: list[str], rows: np.ndarray, top_k: int) -> list[dict]:
        return [p.as_dict() for p in self.classifier.top(names, rows, top_k)]

    def metadata(self) -> dict[str, Any]:
        c = self.classifier
        graph_input, graph_output = c.session.get_inputs()[0], c.session.get_outputs()[0]
        return {
            "model": Path(c.model).name,
            "classes": list(c.class_names or ()),
            "input": {
                "name": graph_input.name,
                "shape": graph_input.shape,
                "layout": c.layout,
                "height": c.height,
                "width": c.width,
                "channels": c.channels,
                "pixel_range": list(c.pixel_range),
            },
            "output": {"name": graph_output.name, "shape": graph_output.shape},
            "precision": c.precision,
            "metrics": {"accuracy": c.metadata["accuracy"]} if "accuracy" in c.metadata else {},
            "limits": {
                "max_images": self.max_batch,
                "max_body_bytes": self.max_body,
                "max_pixels": self.max_pixels,
                "body_timeout_s": self.body_timeout,
            },
            "versions": c.metadata.get("versions", {}),
        }


def _fixed_batch(classifier: Classifier, max_batch: int) -> int | None:
    """The model's batch size where its graph fixes one (``max_batch`` is capped to it, with a
    warning), else None."""
    size = classifier.fixed_batch
    if size is None:
        return None
    if max_batch > size:
        warnings.warn(
            f"{Path(classifier.model).name} takes batches of exactly {size} image"
            f"{'s' if size > 1 else ''}; serving at most {size} per onnxruntime call and per "
            "request (export it again for dynamic batching)",
            CnnforgeWarning,
            stacklevel=4,
        )
    return size


def _overloaded() -> RequestError:
    return RequestError(
        503,
        "overloaded",
        "the server's queue is full; retry after a second",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


async def _read_body(request: Any, service: Service) -> bytes:
    """The request body, its bytes held in ``service`` (the caller releases them): refused
    (413) as soon as it passes ``max_body`` bytes, (503) when bodies fill their memory bound,
    and (408, the connection closed) when ``body_timeout`` seconds pass without a byte of it, as
    nginx's ``client_body_timeout`` does, so a stalled upload does not hold its connection."""
    limit = service.max_body
    # a length that is no number is left to the stream's count below
    declared = _whole_number(request.headers.get("content-length", ""), 18)
    if declared is not None and declared > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    stream = request.stream()
    service.receiving += 1
    try:
        while (chunk := await _next_chunk(stream, service.body_timeout)) is not None:
            if size + len(chunk) > limit:
                raise _too_large(limit)
            service.hold(len(chunk))
            size += len(chunk)
            chunks.append(chunk)
    except BaseException:
        service.release(size)
        raise
    finally:
        service.receiving -= 1
    return b"".join(chunks)


async def _next_chunk(stream: AsyncIterator[bytes], timeout: float) -> bytes | None:
    """The body's next chunk, None at its end."""
    from starlette.requests import ClientDisconnect

    try:
        return await asyncio.wait_for(anext(stream), timeout)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise RequestError(
            408,
            "body_timeout",
            f"no body byte for {timeout:g} s; send the request body right after its headers",
            {"Connection": "close"},
        ) from None
    except ClientDisconnect:
        raise RequestError(400, "disconnected", "the client left before sending its body") from None


def _too_large(limit: int) -> RequestError:
    return RequestError(
        413, "body_too_large", f"request body over {limit:,} bytes; send smaller or fewer images"
    )


def _content_kind(request: Any) -> str:
    """The request's content type, if /predict accepts it (else 415)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data" and not (kind.startswith("image/") or kind in RAW_TYPES):
        raise RequestError(
            415,
            "content_type",
            f"content type {kind or 'none'!r} is not accepted; send multipart/form-data with "
            "image files, or one image's bytes as image/* or application/octet-stream",
        )
    return kind


async def _images(request: Any, kind: str, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) of each image in ``body``: form files, or the raw body."""
    if kind != "multipart/form-data":
        if not body:
            raise RequestError(400, "no_image", "the request body is empty; send an image")
        return [("body", body)]
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, once()).parse()
    except MultiPartException as exc:
        raise RequestError(400, "bad_form", f"malformed multipart body ({exc})") from None
    files = [(n, v) for n, v in form.multi_items() if not isinstance(v, str)]
    if not files:
        raise RequestError(400, "no_image", "the form holds no file; send images as form files")
    if len(files) > max_images:
        raise RequestError(
            413, "too_many_images", f"{len(files)} images in one request; send at most {max_images}"
        )
    try:
        return [(f.filename or field, await f.read()) for field, f in files]
    finally:
        await form.close()


def _whole_number(raw: str, most_digits: int) -> int | None:
    """``raw`` as a whole number if it is one written in at most ``most_digits`` ASCII digits,
    else None. ``str.isdigit`` alone lets through superscripts (``²``, which ``int`` refuses)
    and other scripts' digits, and ``int`` refuses strings of over 4,300 digits."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > most_digits:
        return None
    return int(raw)


def _top_k(request: Any) -> int:
    raw = request.query_params.get("top_k", "5")
    top_k = _whole_number(raw, TOP_K_DIGITS)
    if top_k is None or top_k < 1:
        shown = raw if len(raw) <= 20 else f"{raw[:20]}… ({len(raw):,} characters)"
        raise RequestError(
            400,
            "bad_top_k",
            f"top_k must be a whole number from 1 to {10**TOP_K_DIGITS - 1:,}, got {shown!r}",
        )
    return top_k


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
) -> Any:
    """The ASGI app (Starlette) serving ``model``; the model is loaded now, so a bad file fails
    here, before anything listens. A request may carry at most ``max_batch`` images of at most
    ``max_pixels`` pixels each; at most ``decoders`` images are decoded at once. A body that
    goes ``body_timeout`` seconds without a byte is a 408."""
    _require_serve()
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
    )

    async def predict_route(request: Any) -> Any:
        try:
            top_k = _top_k(request)
            if service.full:  # refused before the body is read
                raise _overloaded()
            kind = _content_kind(request)
            body = await _read_body(request, service)
            try:
                if service.full:  # it filled while the body came in
                    raise _overloaded()
                service.arriving += 1
                try:
                    images = await _images(request, kind, body, service.max_batch)
                    async with service.decoding:
                        batch = await asyncio.to_thread(service.pixels, images)
                finally:
                    service.arriving -= 1
            finally:
                service.release(len(body))
            try:
                rows = await service.batcher.submit(batch)
            except Overloaded:
                raise _overloaded() from None
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
        return JSONResponse(openapi_document(service))

    async def http_error(request: Any, exc: Any) -> Any:  # unknown route, wrong method
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        service.batcher.start()
        yield
        await service.batcher.stop()  # after uvicorn answered what was in flight

    app = Starlette(
        routes=[
            Route("/predict", predict_route, methods=["POST"]),
            Route("/health", health),
            Route("/metadata", metadata),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi),
        ],
        middleware=[
            Middleware(_Observe, metrics=service.metrics),
            Middleware(_Auth, token=token, metrics=service.metrics),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )
    app.state.service = service
    return app


def openapi_document(service: Service) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the routes, with this model's limits."""
    error = {"$ref": "#/components/schemas/Error"}
    json_error = {"content": {"application/json": {"schema": error}}}
    binary = {"type": "string", "format": "binary"}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"cnnforge serve: {Path(service.classifier.model).name}"},
        "components": {
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/predict": {
                "post": {
                    "summary": "Top-k labels of one or several images",
                    "parameters": [
                        {
                            "name": "top_k",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 10**TOP_K_DIGITS - 1,
                                "default": 5,
                            },
                        }
                    ],
                    "requestBody": {
                        "description": f"At most {service.max_batch} images and "
                        f"{service.max_body:,} bytes in all",
                        "content": {
                            "multipart/form-data": {
                                "schema": {"type": "object", "additionalProperties": binary}
                            },
                            "image/*": {"schema": binary},
                            "application/octet-stream": {"schema": binary},
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "{predictions: [{image, top: [{label, probability}]}]}"
                        },
                        **{
                            code: {"description": why, **json_error}
                            for code, why in (
                                ("400", "malformed request, no image, bad top_k"),
                                ("401", "missing or wrong token"),
                                ("408", "no body byte for the body timeout"),
                                ("413", "body over the limit, or too many images"),
                                (
                                    "415",
                                    "content type not accepted, or an image in a format other "
                                    "than PNG, JPEG, BMP, GIF, TIFF, WebP",
                                ),
                                ("422", "an image that does not decode or is over the pixel limit"),
                                ("500", "an unexpected failure (logged)"),
                                ("503", "queue full; retry after Retry-After seconds"),
                            )
                        },
                    },
                }
            },
            "/health": {"get": {"summary": "Liveness (no token needed)", "security": []}},
            "/metadata": {"get": {"summary": "Classes, input, precision, metrics, limits"}},
            "/metrics": {"get": {"summary": "Prometheus text format"}},
            "/openapi.json": {"get": {"summary": "This description"}},
        },
    }


def server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> Any:
    """A uvicorn server for ``app`` (call ``.run()``; set ``.should_exit`` to stop it). Unlike
    uvicorn's own, a signal ends it with a drained, clean return (exit status 0) instead of
    raising the signal again after the shutdown."""
    _require_serve()
    import uvicorn

    class Server(uvicorn.Server):
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
    **options: Any,
) -> None:
    """Serve ``model`` until SIGTERM or Ctrl-C, then drain and return. ``options`` are
    :func:`create_app`'s."""
    if options.get("token") is None and not _is_loopback(host):
        warnings.warn(
            f"serving on {host} without a token: anyone who can reach it can use it; set "
            f"--token or {TOKEN_ENV}",
            CnnforgeWarning,
            stacklevel=2,
        )
    app = create_app(model, **options)
    listening = _listen(host, port)
    server(app, host=host, port=port, log_level=log_level).run(sockets=[listening])


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (before uvicorn starts, so a port in use is one line)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listening = socket.socket(family, kind)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
