"""`cnnforge serve` under `wrk`, next to a bare Starlette route under the same uvicorn, in one run.

For each number of connections (``--connections``, default 32) it drives, with `wrk` (a load
generator written in C, so the client does not eat the server's cores as a Python client would):

- ``bare``: a tiny Starlette app in this file under the same uvicorn settings as `cnnforge serve`
  (httptools, uvloop, access log off) whose one route reads the body and returns a small JSON:
  the web stack's own limit on this machine;
- ``image``: `cnnforge serve MODEL` (``--workers`` each of ``--workers``), ``POST /predict``,
  one PNG of the model's own test data per request (raw body, ``image/png``), cycling through 64;
- ``v2 tensor``: the same server, ``POST /v2/models/NAME/infer`` with Triton's binary tensor
  data extension, ``--max-batch`` test images a request as one UINT8 pixel tensor (nothing to
  decode), the probabilities answered as binary.

Each row: requests/s, images/s, p50/p99 latency (wrk's own), errors (non-2xx answers, connect,
read, write and timeout errors), the server's mean batch (from /metrics, summed over its
processes when it has several), the server's CPU a request (all its threads and processes), and
the ratio of requests/s to the bare route's at the same connections; for tensor requests, images/s
against in-process onnxruntime on the same model at a batch of ``--max-batch`` (``session.run``
alone, timed as `cnnforge bench` times it, after the loads).

wrk runs with one thread and nothing is pinned to cores: on a 2-core machine the server's event
loop, its onnxruntime threads and wrk each need a core at times, and a fixed split (the server on
one core, wrk on the other) would put the loop and onnxruntime on one core; ``--pin`` measures
that split instead (``taskset``: wrk on the last CPU, the servers on the others).

    python benchmarks/serve_load.py MODEL.onnx [--seconds 10] [--connections 32]
        [--workers 1,2] [--max-batch 32] [--max-wait-ms 2] [--pin] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from cnnforge.bench.machine import cpu_name
from cnnforge.core.markdown import markdown_table
from cnnforge.deploy.predict import Classifier
from cnnforge.deploy.runtime import to_layout
from cnnforge.deploy.timing import random_array, time_calls

# wrk's Lua: POST each body in turn (paths given after --), and print one JSON line of
# figures from done() (latency in microseconds)
WRK_SCRIPT = r"""
local bodies, headers, n = {}, {}, 0
function init(args)
  headers["Content-Type"] = args[1]
  if args[2] ~= "" then
    local name, value = args[2]:match("^([^:]+):%s*(.*)$"); headers[name] = value
  end
  for i = 3, #args do
    local f = assert(io.open(args[i], "rb")); bodies[#bodies + 1] = f:read("*a"); f:close()
  end
end
function request()
  n = n % #bodies + 1
  return wrk.format("POST", nil, headers, bodies[n])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.6f, "p50_us": %d, "p99_us": %d, "status": %d, ' ..
    '"socket": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""

BARE_APP = "serve_load:bare_app"  # under --app-dir benchmarks/
SERVER_LOG_LEVEL = "warning"
PIN: dict[str, list[str]] = {"client": [], "server": []}  # taskset prefixes, with --pin


def bare_app():  # noqa: ANN201 (a Starlette app)
    """The bare route: reads the body, answers a small JSON."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def predict(request):  # noqa: ANN001, ANN202
        body = await request.body()
        return JSONResponse({"bytes": len(body)})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(process: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:  # up, answering (a GET on a POST route)
            return
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{url} did not come up")


def start_bare(port: int) -> subprocess.Popen:
    """The bare app under uvicorn with `cnnforge serve`'s settings."""
    command = [sys.executable, "-m", "uvicorn", "--factory", BARE_APP, "--port", str(port)]
    command += ["--app-dir", str(Path(__file__).resolve().parent)]
    command += ["--loop", "uvloop", "--http", "httptools", "--no-access-log"]
    command += ["--log-level", SERVER_LOG_LEVEL]
    process = subprocess.Popen([*PIN["server"], *command])
    wait_up(process, f"http://127.0.0.1:{port}/predict")
    return process


def start_serve(model: str, port: int, workers: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "cnnforge.cli", "serve", model, "--port", str(port)]
    command += ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    if workers > 1:
        command += ["--workers", str(workers)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    process = subprocess.Popen([*PIN["server"], *command])
    wait_up(process, f"http://127.0.0.1:{port}/health")
    return process


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def batch_counts(port: int, workers: int) -> tuple[float, float]:
    """(images, batches) the server has run so far, from /metrics; with several workers each
    answers for itself (``cnnforge_worker{pid}``), so it asks on new connections until it has
    heard from each, and sums."""
    heard: dict[str, tuple[float, float]] = {}
    for _ in range(50 * workers):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        found = dict(re.findall(r"^(cnnforge_batch_size_(?:sum|count)) (\S+)$", text, re.M))
        pid = re.search(r'^cnnforge_worker\{pid="(\d+)"\}', text, re.M)
        key = pid.group(1) if pid else "one"
        heard[key] = (
            float(found["cnnforge_batch_size_sum"]),
            float(found["cnnforge_batch_size_count"]),
        )
        if len(heard) >= workers:
            break
    return sum(h[0] for h in heard.values()), sum(h[1] for h in heard.values())


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` and its children so far: a
    figure of the server's own cost per request that a busy shared machine disturbs far less
    than requests/s."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        pending += [int(c) for c in children]
    return total


def run_wrk(
    url: str,
    kind: str,
    files: list[Path],
    connections: int,
    seconds: float,
    header: str = "",
) -> dict:
    """One wrk run: requests/s, p50/p99 ms, errors; ``header``: one more, ``Name: value``."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    command = [*PIN["client"], "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s"]
    command += ["--timeout", "10s"]
    command += ["-s", script.name, url, "--", kind, header, *map(str, files)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    figures = json.loads(out.strip().splitlines()[-1])
    return {
        "requests": figures["requests"],
        "rps": figures["requests"] / figures["seconds"],
        "p50_ms": figures["p50_us"] / 1e3,
        "p99_ms": figures["p99_us"] / 1e3,
        "errors": figures["status"] + figures["socket"],
    }


def test_pixels(classifier: Classifier, count: int = 128) -> np.ndarray:
    """(count, H, W, C) uint8: the bundled data's test images (random when the model is not
    28×28×1)."""
    shape = (classifier.height, classifier.width, classifier.channels)
    try:
        import cnnforge

        pixels = cnnforge.get("dataset", "fashion_mnist_small").fn(None).x_test[:count]
        return pixels.reshape(count, *shape)  # (N, 28, 28) as the model's (N, 28, 28, 1)
    except Exception:
        return np.random.default_rng(0).integers(0, 256, (count, *shape), dtype=np.uint8)


def png_files(pixels: np.ndarray, folder: Path) -> list[Path]:
    """One PNG a request body."""
    paths = []
    for i, p in enumerate(pixels):
        path = folder / f"{i}.png"
        Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p).save(path, "PNG")
        paths.append(path)
    return paths


def tensor_files(
    classifier: Classifier, pixels: np.ndarray, folder: Path, batch: int
) -> list[tuple[Path, int]]:
    """Open Inference Protocol requests of ``batch`` images each, Triton's binary tensor data
    extension: a JSON header (its length in ``Inference-Header-Content-Length``), then the
    model's pixel input as UINT8 bytes; the probabilities asked for as binary too."""
    session = classifier.session
    paths = []
    for i in range(len(pixels) // batch):
        tensor = to_layout(pixels[i * batch : (i + 1) * batch], classifier.layout)
        data = np.ascontiguousarray(tensor, dtype=np.uint8).tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": session.get_inputs()[0].name,
                        "shape": list(tensor.shape),
                        "datatype": "UINT8",
                        "parameters": {"binary_data_size": len(data)},
                    }
                ],
                "outputs": [
                    {"name": session.get_outputs()[0].name, "parameters": {"binary_data": True}}
                ],
            }
        ).encode()
        path = folder / f"tensor{i}.bin"
        path.write_bytes(header + data)
        paths.append((path, len(header)))
    if len({length for _, length in paths}) != 1:
        raise SystemExit("the tensor requests' headers differ in length")
    return paths


def in_process(args: argparse.Namespace, batch: int) -> float:
    """Images per second of ``session.run`` on ``batch`` images (median call), the model's
    pixels in its range, as `cnnforge bench` times it: the best of onnxruntime's default
    threads and one thread, spinning and not (on a busy 2-core machine a spinning pool of two
    threads ran at half the speed of one thread)."""
    best = 0.0
    for threads, spinning in ((args.threads, None), (args.threads, False), (1, None), (1, False)):
        classifier = Classifier(args.model, threads=threads, spinning=spinning)
        session = classifier.session
        shape = (batch, classifier.height, classifier.width, classifier.channels)
        pixels = random_array(np.random.default_rng(0), "float32", shape, classifier.pixel_range)
        feed = {session.get_inputs()[0].name: to_layout(pixels, classifier.layout)}
        times = time_calls(functools.partial(session.run, None, feed), warmup=20, iterations=50)
        best = max(best, batch / float(np.median(times)))
    return best


def lscpu_flags() -> str:
    """The SIMD flags that matter to onnxruntime's kernels, of those the CPU has."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return "?"
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512"


def measure(
    args: argparse.Namespace, pngs: list[Path], tensors: list[tuple[Path, int]]
) -> list[dict]:
    rows = []
    for connections in args.connections:
        port = free_port()
        bare = start_bare(port)
        try:
            bare_row = load_row(bare, port, 0, "/predict", "image/png", pngs, connections, args)
        finally:
            stop(bare)
        rows.append(bare_row | {"target": "bare Starlette route"})
        for workers in args.workers:
            port = free_port()
            server = start_serve(args.model, port, workers, args)
            label = f"{workers} worker{'s' * (workers > 1)}"
            infer = f"/v2/models/{Path(args.model).stem}/infer"
            header = f"Inference-Header-Content-Length: {tensors[0][1]}"
            files = [path for path, _ in tensors]
            try:
                row = load_row(
                    server, port, workers, "/predict?top_k=1", "image/png", pngs, connections, args
                )
                rows.append(row | {"target": f"cnnforge serve, image/png ({label})"})
                row = load_row(
                    server,
                    port,
                    workers,
                    infer,
                    "application/octet-stream",
                    files,
                    connections,
                    args,
                    header,
                    args.max_batch,
                )
                # right after, while the server idles: a slow spell of the shared machine hits
                # both figures alike
                row["inprocess_images_per_s"] = in_process(args, args.max_batch)
                row["vs_inprocess"] = row["images_per_s"] / row["inprocess_images_per_s"]
                target = f"cnnforge serve, v2 UINT8 tensor of {args.max_batch} ({label})"
                rows.append(row | {"target": target})
            finally:
                stop(server)
        for row in rows[-1 - 2 * len(args.workers) :]:
            row["vs_bare"] = row["rps"] / bare_row["rps"]
            print(json.dumps(row), file=sys.stderr)
    return rows


def load_row(
    process: subprocess.Popen,
    port: int,
    workers: int,
    path: str,
    kind: str,
    files: list[Path],
    connections: int,
    args: argparse.Namespace,
    header: str = "",
    images: int = 1,
) -> dict:
    """One row: a warm-up, then ``args.seconds`` of wrk at ``connections``; the process's CPU a
    request, and (``workers`` > 0: cnnforge serve) the mean batch from /metrics."""
    url = f"http://127.0.0.1:{port}{path}"
    run_wrk(url, kind, files, 4, 1, header)
    before = batch_counts(port, workers) if workers else None
    cpu = cpu_seconds(process.pid)
    row = run_wrk(url, kind, files, connections, args.seconds, header)
    row["cpu_ms"] = (cpu_seconds(process.pid) - cpu) * 1e3 / max(row["requests"], 1)
    row["connections"] = connections
    if before is not None:
        after = batch_counts(port, workers)
        batches = after[1] - before[1]
        row["mean_batch"] = (after[0] - before[0]) / batches if batches > 0 else None
        row["images_per_s"] = row["rps"] * images
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--seconds", type=int, default=10, help="load per row (whole seconds)")
    parser.add_argument("--connections", type=_ints, default=[32])
    parser.add_argument("--workers", type=_ints, default=[1], help="cnnforge serve --workers")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (both sides)")
    parser.add_argument(
        "--pin", action="store_true", help="wrk on the last CPU, servers on the rest"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        PIN["client"] = ["taskset", "-c", str(cpus[-1])]
        PIN["server"] = ["taskset", "-c", ",".join(map(str, cpus[:-1]))]

    classifier = Classifier(args.model, threads=args.threads)
    pixels = test_pixels(classifier)
    with tempfile.TemporaryDirectory() as folder:
        pngs = png_files(pixels[:64], Path(folder))
        tensors = tensor_files(classifier, pixels, Path(folder), args.max_batch)
        rows = measure(args, pngs, tensors)
    machine = (
        f"{cpu_name()} ({lscpu_flags()}), {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end; Python {platform.python_version()}"
    )
    print(
        f"model {args.model}; {machine}; serve --max-batch {args.max_batch} --max-wait-ms "
        f"{args.max_wait_ms}; wrk -t1, {args.seconds:g} s a row"
        f"{', wrk and servers pinned apart' if args.pin else ''}\n"
    )
    print(
        markdown_table(
            [
                "target",
                "conns",
                "req/s",
                "images/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "mean batch",
                "server CPU ms/req",
                "req/s ÷ bare",
                "images/s ÷ in-process (its img/s)",
            ],
            [
                [
                    r["target"],
                    str(r["connections"]),
                    f"{r['rps']:,.0f}",
                    f"{r['images_per_s']:,.0f}" if "images_per_s" in r else "",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    str(r["errors"]),
                    f"{r['mean_batch']:.1f}" if r.get("mean_batch") else "",
                    f"{r['cpu_ms']:.3f}",
                    f"{r['vs_bare']:.0%}" if "vs_bare" in r else "",
                    f"{r['vs_inprocess']:.0%} ({r['inprocess_images_per_s']:,.0f})"
                    if "vs_inprocess" in r
                    else "",
                ]
                for r in rows
            ],
        )
    )
    if args.json:
        figures = {"machine": machine, "rows": rows}
        args.json.write_text(json.dumps(figures, indent=2))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


if __name__ == "__main__":
    main()
