"""Helpers for the server tests: a small classifier with cnnforge metadata (no TensorFlow), a
free loopback port, and a real uvicorn server in a background thread."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tiny_onnx
from PIL import Image

CLASSES = [f"class{i}" for i in range(10)]


def model(
    path: Path, *, size: int = 28, channels: int = 1, layout: str = "NHWC", batch: int | str = "n"
) -> Path:
    """A conv classifier with cnnforge metadata (class names, layout, pixels, accuracy); its
    batch axis open, or fixed to ``batch``."""
    metadata = {
        "cnnforge.class_names": json.dumps(CLASSES),
        "cnnforge.input_layout": layout,
        "cnnforge.pixel_range": json.dumps([0, 1]),
        "cnnforge.precision": "fp32",
        "cnnforge.accuracy": json.dumps({"onnx": 0.5}),
    }
    proto = tiny_onnx.conv_classifier(
        layout=layout,
        channels=channels,
        size=size,
        classes=len(CLASSES),
        metadata=metadata,
        batch=batch,
    )
    return tiny_onnx.save(proto, path)


def png(pixels: np.ndarray) -> bytes:
    """``pixels`` (uint8, H×W or H×W×C) as the bytes of a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread; yields its base URL."""
    from cnnforge.deploy.server import server

    port = free_port()
    instance = server(app, port=port, log_level="warning")
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not instance.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(30)


def wait_until_up(url: str, process: Any = None, timeout: float = 60) -> None:
    """Poll ``url``/health until it answers (a subprocess that dies fails at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


def triton_http():  # noqa: ANN201 (the tritonclient.http module)
    """Triton's own HTTP client, unchanged; the test is skipped where it is not installed."""
    try:
        import tritonclient.http as client
    except (ImportError, RuntimeError):  # RuntimeError: installed without its http extra
        pytest.skip("tritonclient[http] is not installed")
    return client
