"""Tensor requests over gRPC against `cnnforge serve --grpc-port`, beside in-process batches.

Starts `cnnforge serve MODEL --grpc-port` on free loopback ports, then ``--clients`` concurrent
`tritonclient.grpc.aio` callers each send ModelInfer requests of ``--images`` UINT8 images (raw
bytes, as Triton's clients send them) for ``--seconds``. Beside it, in the same run: onnxruntime
on batches of the same size in this process (before and after the load, averaged). Prints
images/s and p50/p99 of each call, errors, the served images/s as a share of in-process ones,
and the CPU milliseconds an image costs the server (from /proc; steadier than rates on a busy
machine) and this process in-process. The client is Python and shares the machine's cores.

    python benchmarks/serve_grpc.py MODEL.onnx [--clients 8] [--images 32] [--seconds 6]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as triton

from cnnforge.core.preprocessing import scale
from cnnforge.deploy.predict import Classifier


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process, or of process ``pid`` (Linux /proc)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(classifier: Classifier, batch: np.ndarray, seconds: float) -> tuple[float, float]:
    """(images/s, CPU ms an image) of onnxruntime on ``batch`` in this process."""
    for _ in range(20):
        classifier.run(batch)
    calls, start, cpu = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - start < seconds:
        classifier.run(batch)
        calls += 1
    images = calls * len(batch)
    return images / (time.perf_counter() - start), (cpu_seconds() - cpu) / images * 1e3


async def load(
    address: str, model: str, name: str, pixels: np.ndarray, options: argparse.Namespace
) -> tuple[list[float], int, float]:
    """(seconds of each call, errors, seconds of the load) of ``options.clients`` callers
    sending ``pixels`` to ``model`` for ``options.seconds``."""
    client = triton.InferenceServerClient(address)
    try:
        deadline = time.monotonic() + 60
        while not await _ready(client):
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up")
            await asyncio.sleep(0.1)
        given = triton.InferInput(name, list(pixels.shape), "UINT8")
        given.set_data_from_numpy(pixels)
        for _ in range(20):
            await client.infer(model, [given])
        latencies: list[float] = []
        errors = 0

        async def caller(end: float) -> None:
            nonlocal errors
            while time.perf_counter() < end:
                start = time.perf_counter()
                try:
                    (await client.infer(model, [given])).as_numpy("probabilities")
                    latencies.append(time.perf_counter() - start)
                except Exception:
                    errors += 1

        return latencies, errors, await _timed(caller, options)
    finally:
        await client.close()


async def _ready(client: triton.InferenceServerClient) -> bool:
    try:
        return await client.is_server_ready()
    except Exception:
        return False


async def _timed(caller, options: argparse.Namespace) -> float:
    start = time.perf_counter()
    end = start + options.seconds
    await asyncio.gather(*(caller(end) for _ in range(options.clients)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime's, both sides")
    options = parser.parse_args()
    classifier = Classifier(options.model, threads=options.threads)
    name = classifier.session.get_inputs()[0].name
    per_image = classifier.session.get_inputs()[0].shape[1:]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (options.images, *per_image), dtype=np.uint8)
    batch = scale(pixels, classifier.pixel_range)
    before = in_process(classifier, batch, options.seconds / 2)
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "cnnforge.cli", "serve", str(options.model)]
    command += ["--port", str(port), "--grpc-port", str(grpc_port)]
    command += ["--max-batch", str(options.images), "--threads", str(options.threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cpu = cpu_seconds(server.pid)  # counted from here: the warm-up calls are included
        latencies, errors, seconds = asyncio.run(
            load(f"127.0.0.1:{grpc_port}", options.model.stem, name, pixels, options)
        )
        served_cpu = (cpu_seconds(server.pid) - cpu) / ((len(latencies) + 20) * len(pixels))
    finally:
        server.terminate()
        server.wait(30)
    after = in_process(classifier, batch, options.seconds / 2)
    local = (before[0] + after[0]) / 2
    served = len(latencies) * len(pixels) / seconds
    p50, p99 = np.percentile(np.array(latencies) * 1e3, [50, 99])
    print(
        f"in-process batch {len(pixels)}: {local:,.0f} images/s ({before[0]:,.0f} before, "
        f"{after[0]:,.0f} after), {(before[1] + after[1]) / 2:.3f} CPU ms an image\n"
        f"gRPC, {options.clients} clients × {len(pixels)} images: {served:,.0f} images/s "
        f"({served / local:.0%} of in-process), p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
        f"{errors} errors, server {served_cpu * 1e3:.3f} CPU ms an image; server exit "
        f"{server.returncode}"
    )


if __name__ == "__main__":
    main()
