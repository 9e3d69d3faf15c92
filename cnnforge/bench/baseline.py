"""The Keras baseline of a benchmark: the same model as a ``tf.function`` call in the same
process, labelled with the device TensorFlow ran it on, and the ratios it gives (speed-ups over
Keras, achieved GFLOP/s and their share of the machine's peak)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.bench.models import BenchModel
from cnnforge.bench.results import DEVICE_KINDS, KERAS, BenchResult, Peak, Timing, make_result
from cnnforge.deploy.timing import random_array


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
    ``cnnforge.source`` metadata naming another file (by name; an absolute path, as older
    exports recorded, only where that file exists)."""
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
    if source.is_absolute():  # exported before the metadata kept names only
        return not source.is_file() or source.resolve() == keras_path.resolve()
    return source.name == keras_path.name


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
        results.append(make_result(KERAS, label, batch, settings, timing.warmup, times))
    return results


def add_efficiency(
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


def add_speedups(
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
