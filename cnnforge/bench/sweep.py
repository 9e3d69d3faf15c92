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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cnnforge.bench.baseline import (
    add_efficiency,
    add_speedups,
    exported_from,
    keras_results,
    load_baseline,
)
from cnnforge.bench.machine import environment, load_average, measure_peak
from cnnforge.bench.models import (
    BenchModel,
    Shapes,
    describe_model,
    unique_labels,
)
from cnnforge.bench.results import (
    CI_METHOD,
    ONNXRUNTIME,
    BenchReport,
    BenchResult,
    Peak,
    Timing,
    make_result,
)
from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.runtime import provider_name
from cnnforge.deploy.timing import (
    make_call,
    strict_session,
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
    model's per-image shape (NCHW read as NHWC) and whose ``cnnforge.source`` metadata, where
    present, names the Keras file (its file name; an older export's absolute path only where that
    file exists). A model from another tool (no such
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
    add_efficiency(results, keras, described, peaks, baseline_of)
    add_speedups(results, keras, baseline_of)
    env["load_average_after"] = load_average()
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
            make_result(ONNXRUNTIME, model.label, batch, settings, timing.warmup, timing.run(call))
        )
    return results


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
