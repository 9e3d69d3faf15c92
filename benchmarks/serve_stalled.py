"""Stalled uploads against `cnnforge serve`: do they lock other clients out?

Starts `cnnforge serve MODEL` on a free loopback port, opens ``--stalled`` connections from
127.0.0.2 that send a /predict request's headers (``Content-Length: 100000``) and then nothing,
and meanwhile runs `wrk` (``--connections`` connections for ``--seconds``) posting one PNG from
127.0.0.1, then sends one lone request from 127.0.0.3. Prints wrk's summary, the lone request's
status and the server's request and error counts. Linux (any 127.x address reaches loopback)
with `wrk` installed.

    python benchmarks/serve_stalled.py MODEL.onnx [--stalled 300] [--connections 16] [--seconds 8]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

from cnnforge.deploy.predict import Classifier

LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
local f = io.open(os.getenv("PNG"), "rb"); wrk.body = f:read("*a"); f:close()
"""
STALLED_HEAD = (
    b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
    b"Content-Type: application/octet-stream\r\n\r\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not come up")


def stall(port: int) -> socket.socket:
    connection = socket.socket()
    connection.bind(("127.0.0.2", 0))
    connection.connect(("127.0.0.1", port))
    connection.sendall(STALLED_HEAD)
    return connection


def lone_request(port: int, body: bytes) -> int:
    """The status of one raw-bytes /predict from 127.0.0.3."""
    with socket.socket() as connection:
        connection.settimeout(30)
        connection.bind(("127.0.0.3", 0))
        connection.connect(("127.0.0.1", port))
        head = (
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
        )
        connection.sendall(head.encode() + body)
        return int(connection.recv(64).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--stalled", type=int, default=300)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    classifier = Classifier(args.model)
    image = Image.new("L" if classifier.channels == 1 else "RGB", (classifier.width,) * 2, 7)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    folder = Path(tempfile.mkdtemp())
    (folder / "image.png").write_bytes(buffer.getvalue())
    (folder / "post.lua").write_text(LUA)
    port = free_port()
    command = [sys.executable, "-m", "cnnforge.cli", "serve", args.model, "--port", str(port)]
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(port)
        stalled = [stall(port) for _ in range(args.stalled)]
        time.sleep(0.5)
        wrk = subprocess.run(
            ["wrk", "-t2", f"-c{args.connections}", f"-d{args.seconds}s"]
            + ["-s", str(folder / "post.lua"), f"http://127.0.0.1:{port}/predict"],
            env={**os.environ, "PNG": str(folder / "image.png")},
            capture_output=True,
            text=True,
            timeout=args.seconds + 30,
        )
        print(wrk.stdout)
        print("lone request from 127.0.0.3:", lone_request(port, buffer.getvalue()))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(("cnnforge_requests_total", "cnnforge_errors_total")):
                    print(line)
        for connection in stalled:
            connection.close()
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
