"""What keeps `cnnforge serve`'s own cost per request small (issue 26): measured in
benchmarks/serve_load.py, held here by behaviour that a change back would break."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import serving
from PIL import Image

from cnnforge.deploy.server import create_app

_png = {"Content-Type": "image/png"}


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return serving.model(tmp_path_factory.mktemp("speed") / "model.onnx")


def test_the_servers_onnxruntime_threads_do_not_spin_between_batches(model):
    # a spinning intra-op pool holds a core after every batch: the event loop's, on 2 cores
    session = create_app(model).state.service.classifier.session
    spinning = session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning"
    )
    assert spinning == "0"


def test_the_body_timeout_is_between_bytes_not_for_the_whole_body(model):
    # one timer a body (not a task and a timer a chunk): a body trickling in, each byte
    # sooner than the timeout, is read to its end; a stalled one is a 408
    app = create_app(model, body_timeout=0.5)
    body = encode(Image.new("L", (28, 28)))
    with serving.running(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            connection.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
            for piece in (body[:20], body[20:40], body[40:]):
                time.sleep(0.3)
                connection.sendall(piece)
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[:20])
            started = time.monotonic()
            answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and 0.4 < time.monotonic() - started < 3
    assert app.state.service.receiving == 0 and app.state.service.body_bytes == 0


def test_small_pngs_are_decoded_on_the_event_loop_and_the_rest_in_a_worker(model, monkeypatch):
    # the hop to a decoding thread costs more than decoding a 28×28 PNG; larger images, and
    # formats whose size is not read from their first bytes, still leave the loop free
    from cnnforge.deploy import serve_service

    on_loop = []

    def recording(data, max_pixels):
        try:
            on_loop.append(asyncio.get_running_loop() is not None)
        except RuntimeError:  # a worker thread
            on_loop.append(False)
        return open_image(data, max_pixels)

    open_image = serve_service.open_image
    monkeypatch.setattr(serve_service, "open_image", recording)
    small, large = Image.new("L", (28, 28)), Image.new("L", (200, 200))
    bodies = [encode(small), encode(large), encode(small, "JPEG")]
    with serving.running(create_app(model)) as base:
        for body in bodies:
            answer = httpx.post(f"{base}/predict", content=body, headers=_png)
            assert answer.status_code == 200, answer.text
    assert on_loop == [True, False, False]


def test_refusals_of_the_token_are_counted_and_timed_by_route(model):
    # auth and metrics are one middleware: a 401 is still counted and timed under its route
    with serving.running(create_app(model, token="s3cret")) as base:
        assert httpx.post(f"{base}/predict", content=b"x", headers=_png).status_code == 401
        assert httpx.get(f"{base}/nowhere").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        text = httpx.get(f"{base}/metrics", headers=auth).text
    assert 'cnnforge_requests_total{route="/predict",status="401"} 1.0' in text
    assert 'cnnforge_requests_total{route="other",status="401"} 1.0' in text
    assert 'cnnforge_errors_total{reason="unauthorized"} 2.0' in text
    assert 'cnnforge_request_seconds_count{route="/predict"} 1.0' in text


@pytest.mark.slow
def test_serve_workers_2_answers_from_two_processes_and_stops_on_sigterm(model):
    port = serving.free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "cnnforge.cli", "serve", str(model), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    body = encode(Image.new("L", (28, 28)))
    try:
        serving.wait_until_up(url, process)
        pids: set[str] = set()
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:  # each GET a new connection
            text = httpx.get(f"{url}/metrics").text
            pids |= set(re.findall(r'^cnnforge_worker\{pid="(\d+)"\} 1\.0$', text, re.M))
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda _: httpx.post(f"{url}/predict", content=body, headers=_png), range(32)
                )
            )
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
    assert len(pids) == 2 and str(process.pid) not in pids
    assert [a.status_code for a in answers] == [200] * 32
    assert process.returncode == 0, output
    assert "Traceback" not in output


def test_jobs_already_queued_join_a_batch_without_a_timed_wait_each(monkeypatch):
    # the batcher takes what is queued at once; only an empty queue is waited on, with a
    # timeout (asyncio.wait_for makes a task and a timer per call)
    from cnnforge.deploy import batching

    timed = []
    wait_for = asyncio.wait_for

    def counting(awaitable, timeout):
        timed.append(timeout)
        return wait_for(awaitable, timeout)

    monkeypatch.setattr(batching.asyncio, "wait_for", counting)
    sizes: list[int] = []

    async def main():
        batcher = batching.Batcher(
            lambda batch: batch,
            max_batch=8,
            max_wait_ms=20,
            max_queue=16,
            on_batch=lambda n, s: sizes.append(n),
        )
        jobs = [asyncio.ensure_future(batcher.submit(np.ones((1, 2)))) for _ in range(8)]
        await asyncio.sleep(0)  # all eight queued before the worker starts
        batcher.start()
        await asyncio.gather(*jobs)
        await batcher.stop()

    asyncio.run(main())
    assert sizes == [8] and timed == []


def test_workers_with_grpc_is_refused_in_one_line(model):
    from click.testing import CliRunner

    from cnnforge.cli import cli

    command = ["serve", str(model), "--workers", "2", "--grpc-port", "0", "--port", "0"]
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "--grpc-port is served by one process only" in line
