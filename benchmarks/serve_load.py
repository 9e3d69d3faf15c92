"""`cnnforge serve` under a closed-loop load, next to in-process onnxruntime on the same model.

Starts `cnnforge serve MODEL` on a free loopback port, then for each concurrency (1, 8, 32, 128)
runs that many clients, each sending its next request as soon as the last is answered, for
``--seconds``: one PNG image per request (raw bytes, ``image/png``), images of the model's own
test data. Reports throughput (requests = images per second), p50/p99 latency, the mean batch the
server ran (from /metrics), errors (any answer but 200, or a lost connection), and in-process
onnxruntime throughput on the same model at that mean batch (``session.run`` alone, timed as
`cnnforge bench` times it, with `cnnforge.deploy.timing`, right after each load while the server
idles), and the ratio served ÷ in-process.

The clients are a minimal HTTP/1.1 keep-alive client on asyncio streams, in this process: httpx
costs about a millisecond of CPU a request, which on a 2-core machine would measure the client.
Client and server share the machine's cores, so served figures include the client's CPU.

    python benchmarks/serve_load.py MODEL.onnx [--seconds 10] [--concurrency 1,8,32,128]
        [--max-batch 32] [--max-wait-ms 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from cnnforge.bench.machine import cpu_name
from cnnforge.core.markdown import markdown_table
from cnnforge.deploy.predict import Classifier
from cnnforge.deploy.runtime import open_session, to_layout
from cnnforge.deploy.timing import latency_stats, random_array, time_calls


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "cnnforge.cli", "serve", model, "--port", str(port)]
    command += ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    command += ["--max-queue", str(args.max_queue)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not come up")


def batch_counts(port: int) -> tuple[float, float]:
    """(images, batches) the server has run so far, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = dict(re.findall(r"^(cnnforge_batch_size_(?:sum|count)) (\S+)$", text, re.M))
    return float(found["cnnforge_batch_size_sum"]), float(found["cnnforge_batch_size_count"])


def test_images(classifier: Classifier, count: int = 64) -> list[bytes]:
    """PNGs of the bundled data's test images (or random pixels when the model is not 28×28)."""
    rng = np.random.default_rng(0)
    shape = (classifier.height, classifier.width, classifier.channels)
    try:
        import cnnforge

        raw = cnnforge.get("dataset", "fashion_mnist_small").fn(None)
        pixels = raw.x_test[:count]
        assert pixels.shape[1:] == shape
    except Exception:
        pixels = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    images = []
    for p in pixels:
        buffer = io.BytesIO()
        Image.fromarray(p[..., 0] if shape[-1] == 1 else p).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


async def client(
    port: int, images: list[bytes], stop_at: float, latencies: list[float], errors: list[str]
) -> None:
    """One closed-loop client on one keep-alive connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = 0
    try:
        while time.perf_counter() < stop_at:
            body = images[n % len(images)]
            n += 1
            head = (
                f"POST /predict?top_k=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            start = time.perf_counter()
            writer.write(head + body)
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionResetError("the server closed the connection")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            status = status_line.split(b" ")[1]
            if status != b"200":
                errors.append(status.decode())
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors.append(type(exc).__name__)
    finally:
        writer.close()


async def load(port: int, images: list[bytes], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    await asyncio.gather(
        *(client(port, images, start + seconds, latencies, errors) for _ in range(clients))
    )
    elapsed = time.perf_counter() - start
    stats = latency_stats(latencies)
    return {
        "requests": len(latencies),
        "throughput": len(latencies) / elapsed,
        "p50_ms": stats["p50"],
        "p99_ms": stats["p99"],
        "errors": len(errors),
    }


def in_process(session: object, classifier: Classifier, batch: int, seconds: float) -> float:
    """Images per second of ``session.run`` on ``batch`` images (median call)."""
    graph_input = session.get_inputs()[0]
    shape = (batch, classifier.height, classifier.width, classifier.channels)
    pixels = random_array(np.random.default_rng(0), "float32", shape, classifier.pixel_range)
    feed = {graph_input.name: to_layout(pixels, classifier.layout)}
    times = time_calls(
        lambda: session.run(None, feed), warmup=20, iterations=50, min_duration_s=seconds
    )
    return batch / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--seconds", type=float, default=10.0, help="load per concurrency")
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (both sides)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    classifier = Classifier(args.model, threads=args.threads)
    session = open_session(args.model, threads=args.threads)
    images = test_images(classifier)
    port = free_port()
    server = start_server(args.model, port, args)
    rows = []
    try:
        asyncio.run(load(port, images, 4, 1.0))  # warm up
        for clients in levels:
            before = batch_counts(port)
            row = asyncio.run(load(port, images, clients, args.seconds))
            after = batch_counts(port)
            row["clients"] = clients
            row["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
            # right after, while the server idles: a slow spell of the shared machine hits
            # both figures of a row alike
            row["inprocess_batch"] = max(1, round(row["mean_batch"]))
            row["inprocess_throughput"] = in_process(
                session, classifier, row["inprocess_batch"], args.seconds / 2
            )
            row["ratio"] = row["throughput"] / row["inprocess_throughput"]
            rows.append(row)
            print(f"{clients} clients: {row}", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    print(
        f"model {args.model}; {cpu_name()}, {os.cpu_count()} cores, {platform.python_version()}; "
        f"serve --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms}; "
        f"{args.seconds:g} s per concurrency\n"
    )
    print(
        markdown_table(
            [
                "clients",
                "served req/s",
                "p50 ms",
                "p99 ms",
                "mean batch",
                "errors",
                "in-process img/s (batch)",
                "served ÷ in-process",
            ],
            [
                [
                    str(r["clients"]),
                    f"{r['throughput']:,.0f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    f"{r['mean_batch']:.1f}",
                    str(r["errors"]),
                    f"{r['inprocess_throughput']:,.0f} ({r['inprocess_batch']})",
                    f"{r['ratio']:.0%}",
                ]
                for r in rows
            ],
        )
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
