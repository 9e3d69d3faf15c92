"""onnxruntime latency: warm-up, then many timed ``session.run`` calls, nothing else timed.

Inputs are made before timing starts; each iteration times exactly one ``run``. A Keras baseline
is timed in the same process, as a ``tf.function`` call (``model.predict`` costs tens of ms per
call in overhead and would make any speed-up a lie), so the speed-up is a ratio measured in one
run on one machine.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.errors import CnnforgeError
from cnnforge.runtime import open_session


@dataclass
class BenchResult:
    runtime: str
    batch_size: int
    provider: str
    threads: int | None
    warmup: int
    iterations: int
    latency_ms: dict[str, float]
    throughput: float  # images per second, from the mean latency


@dataclass
class BenchReport:
    model: str
    environment: dict[str, Any]
    results: list[BenchResult]
    keras: list[BenchResult] = field(default_factory=list)

    def speedups(self) -> dict[int, float]:
        """Keras mean latency / onnxruntime mean latency, per batch size."""
        ort_by_batch = {r.batch_size: r for r in self.results}
        return {
            k.batch_size: k.latency_ms["mean"] / ort_by_batch[k.batch_size].latency_ms["mean"]
            for k in self.keras
            if k.batch_size in ort_by_batch
        }


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "std": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        "min": float(ms.min()),
        "max": float(ms.max()),
    }


def time_calls(call: Callable[[], Any], *, warmup: int, iterations: int) -> list[float]:
    """Seconds taken by each of ``iterations`` calls of ``call``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(provider: str, threads: int | None) -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "provider": provider,
        "threads": threads if threads is not None else "onnxruntime default",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def image_shape(session: Any) -> tuple[int, ...]:
    """The per-image input shape of an image model, or an error naming what the graph says."""
    shape = session.get_inputs()[0].shape
    dims = shape[1:]
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in dims):
        raise CnnforgeError(
            f"model input {session.get_inputs()[0].name!r} has shape {shape}; cnnforge bench "
            "needs a 4-D image input with fixed height, width and channels"
        )
    return tuple(dims)


def _check_counts(batch_sizes: Sequence[int], warmup: int, iterations: int) -> None:
    if not batch_sizes or min(batch_sizes) < 1:
        raise CnnforgeError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if warmup < 0 or iterations < 2:
        raise CnnforgeError(
            f"need warmup >= 0 and iterations >= 2, got warmup={warmup}, iterations={iterations}"
        )


def _keras_results(keras_path, batches, warmup, iterations) -> list[BenchResult]:
    import tensorflow as tf

    from cnnforge.export import load_keras_model

    model = load_keras_model(Path(keras_path))
    forward = tf.function(lambda x: model(x, training=False))
    results = []
    for batch_size, images in batches.items():
        tensor = tf.constant(images)
        times = time_calls(
            lambda t=tensor: forward(t).numpy(), warmup=warmup, iterations=iterations
        )
        results.append(_result("keras tf.function", batch_size, "cpu", None, warmup, times))
    return results


def _result(runtime, batch_size, provider, threads, warmup, times) -> BenchResult:
    stats = latency_stats(times)
    return BenchResult(
        runtime, batch_size, provider, threads, warmup, len(times), stats,
        throughput=batch_size / (stats["mean"] / 1e3),
    )  # fmt: skip


def benchmark(
    model_path: Path | str,
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    threads: int | None = None,
    provider: str = "cpu",
    warmup: int = 10,
    iterations: int = 100,
    keras_model: Path | str | None = None,
) -> BenchReport:
    """Time the ONNX model at each batch size; optionally the Keras model too, in this process."""
    _check_counts(batch_sizes, warmup, iterations)
    if threads is not None and threads < 1:
        raise CnnforgeError(f"threads must be at least 1, got {threads}")
    session = open_session(model_path, provider=provider, threads=threads)
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    shape = image_shape(session)
    batches = {b: rng.uniform(0, 255, (b, *shape)).astype(np.float32) for b in batch_sizes}
    results = []
    for batch_size, images in batches.items():
        feed = {name: images}
        times = time_calls(
            lambda f=feed: session.run(None, f), warmup=warmup, iterations=iterations
        )
        results.append(_result("onnxruntime", batch_size, provider, threads, warmup, times))
    keras = _keras_results(keras_model, batches, warmup, iterations) if keras_model else []
    return BenchReport(str(model_path), environment(provider, threads), results, keras)


def results_as_json(report: BenchReport) -> list[dict[str, Any]]:
    """The JSON form: a list of results, each self-describing (model, environment, speed-up)."""
    speedups = report.speedups()
    rows = []
    for result in [*report.results, *report.keras]:
        row = {**asdict(result), "model": report.model, "environment": report.environment}
        if result.runtime == "onnxruntime" and result.batch_size in speedups:
            row["speedup_vs_keras"] = speedups[result.batch_size]
        rows.append(row)
    return rows
