"""``cnnforge serve --workers N``: N server processes on one port, for machines with more cores
than one process's event loop can use.

Each worker is a whole server of its own (its onnxruntime session,
batcher, limits and metrics), started with ``spawn`` and listening on its own socket bound with
``SO_REUSEPORT``, so the kernel spreads new connections over the workers. onnxruntime's threads
are split: where ``threads`` is not given each worker gets ``available_cpus() // N`` (at least
1). ``/metrics`` is per process: each scrape is answered by the worker its connection reached,
named by the ``pid`` label of ``cnnforge_worker``. SIGTERM or Ctrl-C stops every worker (each
drains what it has in flight) and returns once all have; a worker that fails (a non-zero exit)
stops the others and is one line.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from cnnforge.core.cpus import available_cpus
from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.server import GRACEFUL_TIMEOUT_S, create_app, listen, server, warn_if_open

POLL_S = 0.5


def serve_workers(
    model: Path | str,
    *,
    workers: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    grpc_port: int | None = None,
    **options: Any,
) -> None:
    """Serve ``model`` from ``workers`` processes on ``host:port`` until SIGTERM or Ctrl-C, then
    stop them all and return. ``options`` are :func:`create_app`'s. gRPC (``grpc_port``) is
    served by one process only, not yet by workers: refused in one line."""
    if workers < 1:
        raise CnnforgeError(f"workers must be at least 1, got {workers}")
    if grpc_port is not None:
        raise CnnforgeError(
            "--grpc-port is served by one process only; drop --workers, or run the gRPC server "
            "as a process of its own"
        )
    warn_if_open(host, options.get("token"))
    if options.get("threads") is None:
        options["threads"] = max(1, available_cpus() // workers)
    # held, bound but not listening (so given no connections), until the workers are gone:
    # a busy port is one line here, and port 0 becomes one port for all of them
    reserved = listen(host, port, reuse_port=True)
    port = reserved.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_worker,
            args=(str(model), host, port, log_level, options),
            name=f"cnnforge-serve-{i}",
        )
        for i in range(workers)
    ]
    stopping: list[int] = []
    exited: list[Any] = []  # workers that stopped before any signal to this process
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda sig, _: stopping.append(sig)) for sig in handled}
    try:
        for process in processes:
            process.start()
        while not stopping and all(p.is_alive() for p in processes):
            wait([p.sentinel for p in processes], timeout=POLL_S)
        exited = [p for p in processes if not p.is_alive()]
    finally:
        _stop(processes)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reserved.close()
    failed = [p for p in exited if p.exitcode != 0]  # 0: it was stopped by a signal of its own
    if failed and not stopping:
        raise CnnforgeError(
            f"server worker {failed[0].name} exited with status {failed[0].exitcode}; the "
            "others were stopped (see its message above)"
        )


def _stop(processes: list[Any]) -> None:
    """SIGTERM to every worker still running, then wait for each to drain (killed past the
    graceful timeout)."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        if process.pid is None:  # never started
            continue
        process.join(GRACEFUL_TIMEOUT_S + 5)
        if process.is_alive():
            process.kill()
            process.join()


def _worker(model: str, host: str, port: int, log_level: str, options: dict[str, Any]) -> None:
    """One worker: its own app and socket on the shared port; a bad model is one line."""
    try:
        app = create_app(model, **options)
        listening = listen(host, port, reuse_port=True)
    except CnnforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    server(app, host=host, port=port, log_level=log_level).run(sockets=[listening])
