"""The machine a benchmark runs on: its CPU, load and versions, and its measured peak (an fp32
onnxruntime MatMul, the best call over a few sizes)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.bench.results import Peak
from cnnforge.core.cpus import available_cpus
from cnnforge.core.version import __version__
from cnnforge.deploy.runtime import installed_onnxruntime
from cnnforge.deploy.timing import make_call, strict_session, time_calls

# Square MatMul sizes the peak probe tries: small ones finish inside a scheduler time slice on
# a shared machine, large ones amortize threading; the best of them is the peak.
PEAK_SIZES = {"cpu": (256, 512, 1024), "cuda": (2048, 4096), "tensorrt": (2048, 4096)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """The machine and software a run was measured on, and how busy the machine was."""
    import onnxruntime as ort

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": available_cpus(),  # affinity and cgroup CPU quota
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_packages": installed_onnxruntime(),
        "available_providers": ort.get_available_providers(),
        "cnnforge": __version__,
        "load_average_before": load_average(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def measure_peak(
    provider: str = "cpu",
    threads: int | None = None,
    spinning: bool = True,
    *,
    sizes: Sequence[int] | None = None,
    min_iterations: int = 5,
    min_duration_s: float = 0.25,
) -> Peak:
    """GFLOP/s of an fp32 onnxruntime MatMul (N × N by a constant N × N): the best call over
    the sizes, each timed for ``min_iterations`` calls and ``min_duration_s`` seconds."""
    sizes = tuple(sizes or PEAK_SIZES[provider])
    best, best_size, calls = 0.0, sizes[0], 0
    for n in sizes:
        times = _time_matmul(n, provider, threads, spinning, min_iterations, min_duration_s)
        calls += len(times)
        if 2 * n**3 / min(times) / 1e9 > best:
            best, best_size = 2 * n**3 / min(times) / 1e9, n
    return Peak(provider, threads, spinning, best, best_size, sizes, calls)


def _time_matmul(
    n: int, provider: str, threads: int | None, spinning: bool, iterations: int, seconds: float
) -> list[float]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "peak",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = strict_session(model.SerializeToString(), provider, threads, spinning)
    a = rng.standard_normal((n, n), dtype=np.float32)
    call = make_call(session, {"a": a}, provider, True, "the peak MatMul")
    return time_calls(call, warmup=2, iterations=iterations, min_duration_s=seconds)
