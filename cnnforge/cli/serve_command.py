"""``cnnforge serve``: an exported model behind HTTP (Starlette under uvicorn)."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from cnnforge.cli.options import provider_choice, unknown_options
from cnnforge.deploy.server import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_WAIT_MS,
    TOKEN_ENV,
)


@click.command("serve")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BATCH,
    show_default=True,
    help="Most images in one onnxruntime call (and in one request).",
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(min=0),
    default=DEFAULT_MAX_WAIT_MS,
    show_default=True,
    help="How long a batch waits for more requests.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_QUEUE,
    show_default=True,
    help="Requests waiting for a batch before new ones get 503.",
)
@click.option(
    "--max-body",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BODY,
    show_default=True,
    metavar="BYTES",
    help="Largest request body.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    help="Largest image (width × height), refused from its header before it is decoded.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_BODY_TIMEOUT_S,
    show_default=True,
    metavar="SECONDS",
    help="Longest wait for the next byte of a request body; then 408 and the connection closed.",
)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="Also serve the Open Inference Protocol over gRPC (inference.GRPCInferenceService) on "
    "this port, same host; off unless given. Needs cnnforge[grpc].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="onnxruntime intra-op threads (of each worker; default: the CPUs split among them).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Server processes on the port, each its own model session, batcher and /metrics.",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    help=f"Require Authorization: Bearer TOKEN on every route but /health (also {TOKEN_ENV}).",
)
@click.option("--provider", type=provider_choice(), default="cpu", show_default=True)
@click.option(
    "--name",
    help="The model's name in the Open Inference Protocol (/v2/models/NAME, and over gRPC); "
    "default: the model file's stem.",
)
@unknown_options
def serve(
    model: Path,
    host: str,
    port: int,
    max_batch: int,
    max_wait_ms: float,
    max_queue: int,
    max_body: int,
    max_pixels: int,
    body_timeout: float,
    grpc_port: int | None,
    threads: int | None,
    workers: int,
    token: str | None,
    provider: str,
    name: str | None,
    reject_unknown: bool,
    min_confidence: float | None,
) -> None:
    """Serve an ONNX model over HTTP: POST /predict, /health, /metadata, /metrics, and the Open
    Inference Protocol (KServe v2, Triton's REST API) under /v2; with --grpc-port, the same
    protocol over gRPC too."""
    from cnnforge.deploy.serve_workers import serve_workers
    from cnnforge.deploy.server import serve as run_server

    if workers > 1:
        run_server = functools.partial(serve_workers, workers=workers)
    run_server(
        model,
        host=host,
        port=port,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_body=max_body,
        max_pixels=max_pixels,
        body_timeout=body_timeout,
        grpc_port=grpc_port,
        threads=threads,
        token=token or None,
        provider=provider,
        name=name,
        reject_unknown=reject_unknown,
        min_confidence=min_confidence,
    )
