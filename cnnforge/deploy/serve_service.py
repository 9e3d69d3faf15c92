"""The model behind ``cnnforge serve``: its classifier, batcher, limits and Prometheus metrics,
which the routes of :mod:`cnnforge.deploy.server` share."""

from __future__ import annotations

import asyncio
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.core.imagefiles import UnsupportedImageFormat
from cnnforge.deploy.batching import Batcher
from cnnforge.deploy.images import open_image
from cnnforge.deploy.predict import Classifier, Rows
from cnnforge.deploy.serve_requests import RETRY_AFTER_S, RequestError

DEFAULT_MAX_BODY = 16 * 2**20  # bytes of one request body; documented in docs/deployment.md
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_WAIT_MS = 2.0
DEFAULT_MAX_QUEUE = 256  # requests decoded or waiting for a batch; beyond it a 503
# pixels of one image (4096×4096), well below Pillow's 89 M: a decoded RGBA image ≤ 64 MiB
DEFAULT_MAX_PIXELS = 4096 * 4096
DECODERS = 2  # images decoded at once, whatever the number of requests
# seconds a request body may go without a byte (nginx's client_body_timeout is 60 s); then 408
DEFAULT_BODY_TIMEOUT_S = 30.0
# PNGs of at most this many pixels in all (64×64) are decoded on the event loop: on the 2-core
# EPYC a 28×28 one took 0.06–0.12 ms, the hop to a decoding thread and back 0.12 ms
INLINE_PIXELS = 64 * 64
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
        # with --workers each process answers /metrics for itself: this says which one
        worker = Gauge("cnnforge_worker", "The server process answering (pid)", ["pid"], **reg)
        worker.labels(str(os.getpid())).set(1)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)


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
        reject_unknown: bool = False,
        min_confidence: float | None = None,
    ) -> None:
        if max_body < 1 or max_pixels < 1 or decoders < 1:
            raise CnnforgeError(
                f"max_body ({max_body}), max_pixels ({max_pixels}) and decoders ({decoders}) "
                "must be at least 1"
            )
        if not body_timeout > 0:
            raise CnnforgeError(f"body_timeout must be over 0 seconds, got {body_timeout}")
        self.classifier = Classifier(
            model,
            provider=provider,
            threads=threads,
            reject_unknown=reject_unknown,
            min_confidence=min_confidence,
            # a spinning pool holds a core after each batch, which the event loop needs:
            # 0.97 → 0.67 ms of server CPU a request (benchmarks/serve_load.py, 2 cores)
            spinning=False,
        )
        self.fixed_batch = fixed_batch(self.classifier, max_batch)
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
            raise RequestError(
                503,
                "body_memory",
                f"request bodies being received fill the server's {self.max_body_bytes:,} "
                "bytes for them; retry after a second",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self.body_bytes += size

    def release(self, size: int) -> None:
        self.body_bytes -= size

    def run(self, batch: np.ndarray) -> Rows:
        """One onnxruntime call (``max_batch`` is capped to a fixed batch size, which
        :meth:`Classifier.rows` pads a smaller batch up to)."""
        return self.classifier.rows(batch)

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

    def decodes_inline(self, images: list[tuple[str, bytes]]) -> bool:
        """Whether ``images`` are cheaper to decode on the event loop than in a thread: PNGs
        (whose size their header's first bytes give) of at most :data:`INLINE_PIXELS` in all."""
        total = 0
        for _, data in images:
            if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
                return False
            total += int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
        return total <= INLINE_PIXELS

    def answer(self, names: list[str], rows: Rows, top_k: int) -> list[dict]:
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
            "calibration": c.metadata.get("probability_calibration"),
            # the threshold recorded at export, and the one this server answers "unknown" below
            "unknown": {
                "recorded": c.metadata.get("unknown_threshold"),
                "min_confidence": c.min_confidence,
                "score": c.unknown_rule.score if c.unknown_rule else None,
                "threshold": c.unknown_rule.threshold if c.unknown_rule else None,
            },
            "limits": {
                "max_images": self.max_batch,
                "max_body_bytes": self.max_body,
                "max_pixels": self.max_pixels,
                "body_timeout_s": self.body_timeout,
            },
            "versions": c.metadata.get("versions", {}),
        }


def fixed_batch(classifier: Classifier, max_batch: int) -> int | None:
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
