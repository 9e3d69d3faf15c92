"""onnxruntime latency you can trust: sweeps, statistics with a confidence interval, a Keras
baseline and the machine's measured peak, all in one process and one run.

The method (docs/benchmarks.md says it for users):

- Everything but the call is done before timing starts: sessions, inputs, and with I/O binding
  the device copies of the inputs and the output buffers.
- Each cell (model × provider × threads × batch size) runs ``warmup`` untimed calls, then timed
  calls, one ``perf_counter`` pair around each, until both ``min_iterations`` calls and
  ``min_duration_s`` seconds are reached. Python's garbage collector is off while timing, as in
  ``timeit``.
- Percentiles interpolate linearly between order statistics (numpy's default). The median's
  confidence interval is distribution-free (order statistics and the binomial distribution), see
  :func:`median_ci`.
- Throughput is batch size / mean latency (what a stream of calls sustains, outliers included);
  achieved GFLOP/s is FLOPs per image (counted from the graph,
  :func:`cnnforge.deploy.onnxinfo.flops_per_image`) × batch size / median latency (the typical call,
  robust to a busy neighbour).
- The peak is an fp32 onnxruntime MatMul of two N × N matrices (the second a constant, as model
  weights are; a few sizes of N) on the same provider with the same threads and spinning: the
  best call's GFLOP/s, as peak probes (STREAM, peak-FLOPS loops) report it, since contention
  only ever slows a call down. Each result states its share of it.
- The Keras baseline is a ``tf.function`` call in the same process (``model.predict`` costs tens
  of ms per call in overhead and would make any speed-up a lie), labelled with the kind of
  device TensorFlow ran it on (``cpu``, ``gpu``). Speed-ups are ratios of medians, of the same
  model on the same kind of device at the same batch size (:func:`benchmark` says which ONNX
  models count as the Keras model's).
"""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.bench.models import (
    BenchModel,
    Shapes,
    describe_model,
    unique_labels,
)
from cnnforge.core.errors import CnnforgeError
from cnnforge.core.version import __version__
from cnnforge.deploy.runtime import installed_onnxruntime, provider_name
from cnnforge.deploy.timing import (
    latency_stats,
    make_call,
    median_ci,
    random_array,
    strict_session,
    time_calls,
)

CI_METHOD = "distribution-free order-statistic interval (binomial), 95%"
ONNXRUNTIME = "onnxruntime"
KERAS = "keras tf.function"
# Square MatMul sizes the peak probe tries: small ones finish inside a scheduler time slice on
# a shared machine, large ones amortize threading; the best of them is the peak.
PEAK_SIZES = {"cpu": (256, 512, 1024), "cuda": (2048, 4096), "tensorrt": (2048, 4096)}
# The kind of device each onnxruntime provider runs on: a cell is compared with a Keras baseline
# that TensorFlow ran on the same kind.
DEVICE_KINDS = {"cpu": "cpu", "cuda": "gpu", "tensorrt": "gpu"}

# --- measuring -------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """One cell of the sweep: its settings, latency statistics and what they mean."""

    runtime: str
    model: str  # the label: cnnforge.precision metadata, else the file name
    batch_size: int
    provider: str
    threads: int | None  # None: the runtime's default
    spinning: bool | None  # session.intra_op.allow_spinning; None where it does not apply
    io_binding: bool | None
    warmup: int
    iterations: int
    duration_s: float
    latency_ms: dict[str, float]
    p50_ci_ms: tuple[float, float]
    ci_coverage: float
    throughput: float  # images per second, batch size / mean latency
    gflops: float | None = None  # achieved: FLOPs per image × batch size / median latency
    peak_gflops: float | None = None  # the measured peak at the same provider and threads
    peak_share: float | None = None  # gflops / peak_gflops
    # Keras p50 / this p50: the baseline of the same model, device kind and batch size
    speedup_vs_keras: float | None = None
    samples_ms: list[float] = field(default_factory=list, repr=False)  # kept out of the JSON


@dataclass
class Peak:
    """What this machine's cores (or GPU) do on an fp32 matrix multiply, measured here."""

    provider: str
    threads: int | None
    spinning: bool
    gflops: float
    matrix_size: int  # the size of the best call
    sizes: tuple[int, ...]
    calls: int

    @property
    def what(self) -> str:
        threads = "default" if self.threads is None else self.threads
        sizes = ", ".join(map(str, self.sizes))
        return (
            f"onnxruntime fp32 MatMul N x N by a constant N x N, N in {sizes}, {self.provider}, "
            f"threads {threads}: best of {self.calls} calls, at N = {self.matrix_size}"
        )


@dataclass
class BenchReport:
    models: list[BenchModel]
    environment: dict[str, Any]
    sweep: dict[str, Any]
    results: list[BenchResult]  # onnxruntime cells
    keras: list[BenchResult] = field(default_factory=list)
    peaks: list[Peak] = field(default_factory=list)

    def speedups(self) -> dict[tuple[str, str, int | None, int], float]:
        """Keras p50 / onnxruntime p50 per (model, provider, threads, batch size)."""
        return {
            (r.model, r.provider, r.threads, r.batch_size): r.speedup_vs_keras
            for r in self.results
            if r.speedup_vs_keras is not None
        }

    def best_threads(self) -> list[dict[str, Any]]:
        """Per model, provider and batch size: the thread count with the lowest median."""
        return best_threads(results_as_json(self))


def best_threads(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fastest thread count per (model, provider, batch size) of onnxruntime result rows.

    ``clear`` says whether its median's interval lies wholly below every other thread count's.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["runtime"] == ONNXRUNTIME:
            groups.setdefault((row["model"], row["provider"], row["batch_size"]), []).append(row)
    best = []
    for (model, provider, batch), cells in groups.items():
        fastest = min(cells, key=lambda r: r["latency_ms"]["p50"])
        others = [r for r in cells if r is not fastest]
        high = fastest.get("p50_ci_ms", [fastest["latency_ms"]["p50"]] * 2)[1]
        clear = bool(others) and all(
            high < r.get("p50_ci_ms", [r["latency_ms"]["p50"]] * 2)[0] for r in others
        )
        best.append(
            {
                "model": model,
                "provider": provider,
                "batch_size": batch,
                "threads": fastest["threads"],
                "p50_ms": fastest["latency_ms"]["p50"],
                "compared": len(cells),
                "clear": clear,
            }
        )
    return best


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

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_packages": installed_onnxruntime(),
        "available_providers": ort.get_available_providers(),
        "cnnforge": __version__,
        "load_average_before": _load_average(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _load_average() -> list[float] | None:
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


def _result(
    runtime: str,
    model: str,
    batch_size: int,
    settings: dict[str, Any],
    warmup: int,
    times: list[float],
) -> BenchResult:
    stats = latency_stats(times)
    low, high, coverage = median_ci(times)
    return BenchResult(
        runtime=runtime,
        model=model,
        batch_size=batch_size,
        provider=settings["provider"],
        threads=settings["threads"],
        spinning=settings["spinning"],
        io_binding=settings["io_binding"],
        warmup=warmup,
        iterations=len(times),
        duration_s=float(sum(times)),
        latency_ms=stats,
        p50_ci_ms=(low * 1e3, high * 1e3),
        ci_coverage=coverage,
        throughput=batch_size / (stats["mean"] / 1e3),
        samples_ms=[t * 1e3 for t in times],
    )


@dataclass(frozen=True)
class Timing:
    """How long each cell is timed."""

    warmup: int = 10
    min_iterations: int = 100
    min_duration_s: float = 1.0

    def check(self) -> None:
        if self.warmup < 0 or self.min_iterations < 2:
            raise CnnforgeError(
                f"need warmup >= 0 and min iterations >= 2, got warmup={self.warmup}, "
                f"min iterations={self.min_iterations}"
            )
        if not self.min_duration_s > 0:
            raise CnnforgeError(
                f"min duration must be > 0 s, got {self.min_duration_s}; use a small value like "
                "0.1 to let the iteration count decide"
            )

    def run(self, call: Callable[[], Any]) -> list[float]:
        return time_calls(
            call,
            warmup=self.warmup,
            iterations=self.min_iterations,
            min_duration_s=self.min_duration_s,
        )


def _check_axes(
    batch_sizes: tuple[int, ...] | None, thread_counts: tuple, providers: tuple[str, ...]
) -> None:
    if batch_sizes is not None and (not batch_sizes or min(batch_sizes) < 1):
        raise CnnforgeError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if any(t is not None and t < 1 for t in thread_counts):
        bad = [t for t in thread_counts if t is not None]
        raise CnnforgeError(f"threads must be at least 1 (or default), got {bad}")
    if not providers or len(set(providers)) < len(providers):
        raise CnnforgeError(f"give each provider once, got {list(providers)}")
    for provider in providers:
        provider_name(provider)


def _as_tuple(value: Any, default: tuple) -> tuple:
    if value is None:
        return default
    if isinstance(value, (str, int)):
        return (value,)
    return tuple(value)


def benchmark(
    models: Path | str | Sequence[Path | str],
    *,
    batch_sizes: Sequence[int] | None = None,
    threads: int | None | Sequence[int | None] = None,
    providers: str | Sequence[str] = "cpu",
    spinning: bool = True,
    io_binding: bool = False,
    warmup: int = 10,
    min_iterations: int = 100,
    min_duration_s: float = 1.0,
    keras_model: Path | str | Any | None = None,
    shapes: Shapes | None = None,
    peak: bool = True,
    progress: Callable[[str], None] = lambda message: None,
) -> BenchReport:
    """Time every model × provider × thread count × batch size cell, in this process.

    ``threads`` is one count or several (None: onnxruntime's default); ``batch_sizes`` None means
    1, 8, 32, or the model's own where its batch axis is fixed. ``keras_model`` (a ``.keras``
    path or a Keras model) adds the ``tf.function`` baseline; ``peak`` the MatMul microbenchmark
    per provider and thread count; ``shapes`` says what to feed a model that is not an image
    classifier (per-item dims by input name; the key None for a model's only input).

    Speed-ups over Keras: the Keras model is the baseline of the ONNX models exported from it,
    and of those only (:func:`exported_from`): an ONNX model whose one input takes the Keras
    model's per-image shape (NCHW read as NHWC) and whose ``cnnforge.source`` metadata, where it
    names a file that exists, names the Keras file itself. A model from another tool (no such
    metadata) with the same input shape counts as an export of it; a model exported from
    another ``.keras`` file, or taking other images, gets no speed-up. A cell's speed-up is the
    Keras median at the same batch size on the same kind of device (``DEVICE_KINDS``: cpu for
    the cpu provider, gpu for cuda and tensorrt; the Keras rows say where TensorFlow ran) over
    the cell's median; a cell with no such baseline gets none. ``sweep["keras_baseline_of"]``
    lists the models it was the baseline of.
    """
    paths = [models] if isinstance(models, (str, Path)) else list(models)
    thread_counts = _as_tuple(threads, (None,))
    provider_list = _as_tuple(providers, ("cpu",))
    asked = tuple(batch_sizes) if batch_sizes is not None else None
    timing = Timing(warmup, min_iterations, min_duration_s)
    timing.check()
    _check_axes(asked, thread_counts, provider_list)
    if not paths:
        raise CnnforgeError("no model given; name one or more .onnx files")
    if len({Path(p).resolve() for p in paths}) < len(paths):
        raise CnnforgeError("a model is given twice; name each .onnx file once")
    described = [describe_model(p, batch_sizes=asked, shapes=shapes) for p in paths]
    unique_labels(described)

    env = environment()
    peaks = []
    for provider in provider_list if peak else ():
        for count in thread_counts:
            progress(f"peak: fp32 MatMul, {provider}, threads {count or 'default'}")
            peaks.append(measure_peak(provider, count, spinning))
    results: list[BenchResult] = []
    cells = len(provider_list) * len(thread_counts) * sum(len(m.batch_sizes) for m in described)
    for model in described:
        for provider in provider_list:
            for count in thread_counts:
                settings = {
                    "provider": provider,
                    "threads": count,
                    "spinning": spinning,
                    "io_binding": io_binding,
                }
                results += _time_model(model, settings, timing, progress, len(results), cells)
    keras: list[BenchResult] = []
    baseline_of: dict[str, str] = {}  # ONNX model label -> the label of its Keras baseline
    if keras_model is not None:
        loaded, keras_label, keras_path = load_baseline(keras_model)
        keras_shape = tuple(loaded.inputs[0].shape[1:])
        baseline_of = {
            m.label: keras_label for m in described if exported_from(m, keras_path, keras_shape)
        }
        batches = sorted({b for m in described for b in m.batch_sizes})
        progress(f"Keras baseline, batch sizes {', '.join(map(str, batches))}")
        keras = keras_results(loaded, batches, timing, env, label=keras_label)
    _add_efficiency(results, keras, described, peaks, baseline_of)
    _add_speedups(results, keras, baseline_of)
    env["load_average_after"] = _load_average()
    sweep = _sweep(
        described,
        provider_list,
        thread_counts,
        spinning,
        io_binding,
        timing,
        keras[0].model if keras else None,
        peaks,
    )
    sweep["keras_baseline_of"] = list(baseline_of)
    return BenchReport(described, env, sweep, results, keras, peaks)


def _time_model(
    model: BenchModel,
    settings: dict[str, Any],
    timing: Timing,
    progress: Callable[[str], None],
    done: int,
    cells: int,
) -> list[BenchResult]:
    """Every batch size of ``model`` in one session (its provider, threads and spinning)."""
    session = strict_session(
        model.path, settings["provider"], settings["threads"], settings["spinning"]
    )
    results = []
    for batch in model.batch_sizes:
        progress(
            f"{done + len(results) + 1}/{cells}: {model.label}, {settings['provider']}, "
            f"threads {settings['threads'] or 'default'}, batch {batch}"
        )
        call = make_call(
            session, model.arrays(batch), settings["provider"], settings["io_binding"], model.path
        )
        results.append(
            _result(ONNXRUNTIME, model.label, batch, settings, timing.warmup, timing.run(call))
        )
    return results


def load_baseline(keras_model: Path | str | Any) -> tuple[Any, str, Path | None]:
    """The Keras model of a baseline, its label (the file name, else the model's name) and its
    file (None for a model given as an object)."""
    if isinstance(keras_model, (str, Path)):
        from cnnforge.modeling.keras_io import load_keras_model

        path = Path(keras_model)
        return load_keras_model(path), path.name, path
    return keras_model, keras_model.name, None


def exported_from(model: BenchModel, keras_path: Path | None, keras_shape: tuple) -> bool:
    """Whether the ONNX ``model`` counts as exported from the Keras baseline (see
    :func:`benchmark`): one input of the Keras model's per-image shape, and no
    ``cnnforge.source`` metadata naming another existing file."""
    if len(model.feeds) != 1:
        return False
    shape = model.feeds[0].shape
    if model.layout == "NCHW":
        shape = (*shape[1:], shape[0])
    if tuple(shape) != tuple(keras_shape):
        return False
    if model.source is None or keras_path is None:
        return True
    source = Path(model.source)
    return not source.is_file() or source.resolve() == keras_path.resolve()


def device_kind(tf_device: str) -> str:
    """``cpu`` or ``gpu`` (any type TensorFlow names, lower case) from a TensorFlow device
    string such as ``/job:localhost/replica:0/task:0/device:GPU:0``; ``cpu`` when it is empty."""
    match = re.search(r"device:([A-Za-z_]+):\d+", tf_device)
    return match.group(1).lower() if match else "cpu"


def keras_results(
    keras_model: Path | str | Any,
    batch_sizes: Sequence[int],
    timing: Timing,
    env: dict[str, Any],
    *,
    label: str | None = None,
) -> list[BenchResult]:
    """The Keras model as a ``tf.function`` call at each batch size (TensorFlow's own threads).

    The first call of each batch size traces the function; it is made before the warm-up. The
    rows' provider is the kind of device TensorFlow ran the call on (:func:`device_kind` of the
    output tensor's device, which ``env["keras_device"]`` records in full).
    """
    import keras
    import tensorflow as tf

    model, own_label, _ = load_baseline(keras_model)
    label = label or own_label
    env.update(tensorflow=tf.__version__, keras=keras.__version__)
    forward = tf.function(lambda x: model(x, training=False))
    shape = tuple(model.inputs[0].shape[1:])
    results = []
    for batch in batch_sizes:
        tensor = tf.constant(
            random_array(np.random.default_rng(0), "float32", (batch, *shape), (0.0, 255.0))
        )
        device = forward(tensor).device  # traces; where the model's output was computed
        env["keras_device"] = device
        settings = {
            "provider": device_kind(device),
            "threads": None,
            "spinning": None,
            "io_binding": None,
        }
        times = timing.run(lambda t=tensor: forward(t).numpy())
        results.append(_result(KERAS, label, batch, settings, timing.warmup, times))
    return results


def _add_efficiency(
    results: list[BenchResult],
    keras: list[BenchResult],
    models: list[BenchModel],
    peaks: list[Peak],
    baseline_of: dict[str, str] | None = None,
) -> None:
    flops = {m.label: m.flops_per_image for m in models}
    peak_of = {(p.provider, p.threads): p.gflops for p in peaks}
    for result in results:
        _efficiency(result, flops.get(result.model), peak_of.get((result.provider, result.threads)))
    # The Keras model does the work of the ONNX models exported from it; it runs on TensorFlow's
    # own pool (all cores): compare it with the default-thread peak of a provider on its kind of
    # device, else the largest peak measured on that kind.
    exported = [m for m in models if m.label in (baseline_of or {})]
    reference = exported[0].flops_per_image if exported else None
    for result in keras:
        kind = [p for p in peaks if DEVICE_KINDS.get(p.provider) == result.provider]
        default = [p.gflops for p in kind if p.threads is None]
        _efficiency(result, reference, max(default or [p.gflops for p in kind], default=None))


def _efficiency(result: BenchResult, flops: int | None, peak: float | None) -> None:
    result.peak_gflops = peak
    if flops:
        result.gflops = flops * result.batch_size / (result.latency_ms["p50"] / 1e3) / 1e9
        result.peak_share = result.gflops / peak if peak else None


def _add_speedups(
    results: list[BenchResult], keras: list[BenchResult], baseline_of: dict[str, str]
) -> None:
    """Keras p50 / cell p50, keyed by (model, device kind, batch size): a cell is compared only
    with the Keras baseline of its own model (``baseline_of``: ONNX label -> Keras label), run
    on the kind of device its provider uses, at its batch size; others get no speed-up."""
    keras_p50 = {(k.model, k.provider, k.batch_size): k.latency_ms["p50"] for k in keras}
    for result in results:
        key = (
            baseline_of.get(result.model),
            DEVICE_KINDS.get(result.provider),
            result.batch_size,
        )
        result.speedup_vs_keras = (
            keras_p50[key] / result.latency_ms["p50"] if key in keras_p50 else None
        )


def _sweep(
    models: list[BenchModel],
    providers: tuple[str, ...],
    threads: tuple,
    spinning: bool,
    io_binding: bool,
    timing: Timing,
    keras_model: str | None,
    peaks: list[Peak],
) -> dict[str, Any]:
    return {
        "models": [
            {
                "label": m.label,
                "path": m.path,
                "precision": m.precision,
                "layout": m.layout,
                "inputs": [
                    {"name": f.name, "dtype": f.dtype, "shape": list(f.shape)} for f in m.feeds
                ],
                "flops_per_image": m.flops_per_image,
                "batch_sizes": list(m.batch_sizes),
            }
            for m in models
        ],
        "providers": list(providers),
        "threads": list(threads),
        "batch_sizes": sorted({b for m in models for b in m.batch_sizes}),
        "spinning": spinning,
        "io_binding": io_binding,
        "inter_op_threads": 1,
        "graph_optimization": "ORT_ENABLE_ALL",
        "warmup": timing.warmup,
        "min_iterations": timing.min_iterations,
        "min_duration_s": timing.min_duration_s,
        "ci": CI_METHOD,
        "keras_model": keras_model,
        "peaks": [
            {
                "provider": p.provider,
                "threads": p.threads,
                "gflops": p.gflops,
                "matrix_size": p.matrix_size,
                "what": p.what,
            }
            for p in peaks
        ],
    }


def results_as_json(report: BenchReport) -> list[dict[str, Any]]:
    """The JSON form: a list of self-describing results (settings, statistics, model, machine)."""
    paths = {m.label: m.path for m in report.models}
    rows = []
    for result in [*report.results, *report.keras]:
        row = asdict(result)
        del row["samples_ms"]
        row["p50_ci_ms"] = list(result.p50_ci_ms)
        row["model_path"] = paths.get(result.model, result.model)
        row["environment"] = report.environment
        row["sweep"] = report.sweep
        rows.append(row)
    return rows
