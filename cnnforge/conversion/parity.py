"""Keras vs onnxruntime on the same images: every mismatch gathered, per batch size and output;
and the accuracy gate that decides whether a reduced-precision variant is worth keeping.

Like Optimum's ``validate_model_outputs``, the check runs every case before judging, so a
failure reports each batch size's and each output's difference rather than the first that broke.

What "the same answers" means depends on the precision (the tolerances export uses):

- float32: every probability within ``atol`` (1e-4) of Keras, and top-1 agreement of at least
  0.999: a label may flip only where two classes tie within rounding (about 1 image in 1000).
- float16: every probability within ``atol`` (1e-2): half precision keeps about three
  significant digits, and the probabilities of a small CNN moved by < 1e-3 here; top-1
  agreement of at least 0.99, since a 1e-2 move can flip a label only between near-ties.
- int8: probabilities move by several hundredths by design, so no element-wise bound is
  meaningful. The check is top-1 agreement with Keras (``min_top1_agreement``, 0.95) per batch
  size, and the accuracy gate on the whole test split.

Whatever the precision, a NaN or infinite output (Keras' or onnxruntime's) fails: ``nan > atol``
is false, so a broken model would otherwise pass every bound.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnforge.core.contract import OUTPUT_NAME
from cnnforge.deploy.runtime import open_session, prediction_batch_size, to_layout


@dataclass
class ParityCase:
    batch_size: int
    images: int
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float
    output: str = OUTPUT_NAME
    nonfinite_keras: int = 0  # NaN or infinite values among Keras' outputs
    nonfinite_onnx: int = 0  # ... and among onnxruntime's


@dataclass
class AccuracyCheck:
    """Test-split accuracy of the ONNX variant next to the Keras model's, and the verdict."""

    data: str
    images: int
    keras: float
    onnxruntime: float
    drop_points: float  # accuracy lost by the variant, in percentage points (negative: gained)
    max_drop_points: float
    passed: bool
    forced: bool = False
    split: str = "test"

    @classmethod
    def judge(
        cls, data: str, images: int, keras: float, onnxruntime: float, max_drop_points: float
    ) -> AccuracyCheck:
        drop = (keras - onnxruntime) * 100
        # A hair of slack: 0.1 - 0.09 is not 0.01 in binary floating point.
        passed = drop <= max_drop_points + 1e-9
        return cls(data, images, keras, onnxruntime, round(drop, 4), max_drop_points, passed)

    def summary(self) -> str:
        change = -self.drop_points or 0.0  # no "-0.00"
        return (
            f"test accuracy {self.onnxruntime:.2%} with onnxruntime vs {self.keras:.2%} with "
            f"Keras ({change:+.2f} points; the gate allows a loss of {self.max_drop_points:g})"
        )


@dataclass
class ParityReport:
    passed: bool
    atol: float | None  # None: probabilities are not compared element-wise (int8)
    inputs: str
    cases: list[ParityCase]
    batch_axis_dynamic: bool
    mismatches: list[str] = field(default_factory=list)
    opset: int | None = None
    min_top1_agreement: float | None = None
    precision: str = "fp32"
    layout: str = "NHWC"
    # The temperature-scaled graph next to the uncalibrated one checked above (calibrate.py).
    calibration: dict | None = None
    accuracy: AccuracyCheck | None = None

    def summary(self) -> str:
        if not self.passed:
            return "; ".join(self.mismatches)
        worst = max(c.max_abs_diff for c in self.cases)
        agree = min(c.top1_agreement for c in self.cases)
        bound = f" (atol {self.atol:g})" if self.atol is not None else ""
        floor = (
            f" (at least {_percent(self.min_top1_agreement)})"
            if self.min_top1_agreement is not None
            else ""
        )
        return f"max abs diff {worst:.2e}{bound}, top-1 agreement {agree:.2%}{floor}"


def _percent(fraction: float) -> str:
    """0.999 as "99.9%", 0.95 as "95%": as many digits as the floor was given with."""
    return f"{fraction * 100:g}%"


def _as_list(outputs: Any) -> list[np.ndarray]:
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return [np.asarray(o) for o in outputs]


_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _as_graph(model: Any) -> Any:
    """``model(x, training=False)`` as one TensorFlow graph for any batch size, traced once per
    model. Called eagerly, a functional Keras model keeps every layer's output until the call
    ends (about 100 MB an image for MobileNetV2 at 224×224); a graph frees each once used, and
    a batch of one ran in 0.1 s instead of 1.3 s there."""
    if model not in _graphs:
        import tensorflow as tf

        held = weakref.ref(model)  # the cache must not keep the model alive
        shape = (None, *model.inputs[0].shape[1:])
        _graphs[model] = tf.function(
            lambda x: held()(x, training=False),
            input_signature=[tf.TensorSpec(shape, tf.float32)],
        )
    return _graphs[model]


def keras_outputs(model: Any, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Every output of the Keras model on ``images`` (NHWC), ``batch_size`` at a time."""
    forward = _as_graph(model)
    batches = [
        _as_list(forward(images[i : i + batch_size].astype(np.float32)))
        for i in range(0, len(images), batch_size)
    ]
    return [np.concatenate(parts) for parts in zip(*batches, strict=True)]


def onnx_outputs(session: Any, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Every output of the session on ``images`` (already in the model's layout)."""
    name = session.get_inputs()[0].name
    batches = [
        session.run(None, {name: images[i : i + batch_size].astype(np.float32)})
        for i in range(0, len(images), batch_size)
    ]
    return [np.concatenate(parts) for parts in zip(*batches, strict=True)]


def _compare(batch_size: int, name: str, expected: np.ndarray, actual: np.ndarray) -> ParityCase:
    diff = np.abs(actual.astype(np.float64) - expected)
    return ParityCase(
        batch_size=batch_size,
        images=len(expected),
        max_abs_diff=float(diff.max()),
        max_rel_diff=float((diff / np.maximum(np.abs(expected), 1e-6)).max()),
        top1_agreement=float(np.mean(actual.argmax(-1) == expected.argmax(-1))),
        output=name,
        nonfinite_keras=int(np.size(expected) - np.count_nonzero(np.isfinite(expected))),
        nonfinite_onnx=int(np.size(actual) - np.count_nonzero(np.isfinite(actual))),
    )


def _judge(case: ParityCase, atol: float | None, min_agreement: float | None) -> list[str]:
    where = f"batch {case.batch_size}, {case.output}"
    if case.nonfinite_keras or case.nonfinite_onnx:
        return [
            f"{where}: non-finite outputs (NaN or inf): {case.nonfinite_keras} in Keras, "
            f"{case.nonfinite_onnx} in ONNX; check the model's weights"
        ]
    problems = []
    if atol is not None and case.max_abs_diff > atol:
        problems.append(
            f"{where}: max abs diff {case.max_abs_diff:.3e} > atol {atol:g} "
            f"(top-1 agreement {case.top1_agreement:.2%})"
        )
    if min_agreement is not None and case.top1_agreement < min_agreement:
        problems.append(
            f"{where}: top-1 agreement {case.top1_agreement:.2%} < {_percent(min_agreement)} "
            f"(max abs diff {case.max_abs_diff:.3e})"
        )
    return problems


def check_parity(
    model: Any,
    onnx_model: bytes | str,
    images: np.ndarray,
    *,
    inputs: str,
    atol: float | None = 1e-4,
    min_top1_agreement: float | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    batch_one_images: int = 64,
    layout: str = "NHWC",
    provider: str = "cpu",
) -> ParityReport:
    """Compare ``model`` (Keras) with ``onnx_model`` on ``images`` (NHWC) at each batch size.

    ``layout`` is the ONNX model's input layout; the images are transposed for it.
    """
    session = open_session(onnx_model, provider=provider)
    batch_dim = session.get_inputs()[0].shape[0]
    names = [o.name for o in session.get_outputs()]
    cases, mismatches = [], []
    for batch_size in batch_sizes:
        subset = images[:batch_one_images] if batch_size == 1 else images
        expected = keras_outputs(model, subset, batch_size)
        actual = onnx_outputs(session, to_layout(subset, layout), batch_size)
        if len(actual) != len(expected):
            mismatches.append(
                f"batch {batch_size}: ONNX has {len(actual)} outputs, Keras {len(expected)}"
            )
            continue
        for name, want, got in zip(names, expected, actual, strict=True):
            if got.shape != want.shape:
                mismatches.append(
                    f"batch {batch_size}, {name}: ONNX shape {got.shape} != Keras {want.shape}"
                )
                continue
            cases.append(_compare(batch_size, name, want, got))
            mismatches += _judge(cases[-1], atol, min_top1_agreement)
    dynamic = isinstance(batch_dim, str) or batch_dim is None
    if not dynamic:
        mismatches.append(f"batch axis is fixed at {batch_dim}; it must be dynamic")
    return ParityReport(
        not mismatches,
        atol,
        inputs,
        cases,
        dynamic,
        mismatches,
        min_top1_agreement=min_top1_agreement,
        layout=layout,
    )


def measure_accuracy(
    model: Any,
    onnx_model: bytes | str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    data: str,
    max_drop_points: float,
    layout: str = "NHWC",
    provider: str = "cpu",
    batch_size: int | None = None,
) -> AccuracyCheck:
    """Accuracy of Keras and of onnxruntime on the same labelled images (NHWC), ``batch_size``
    at a time (None: as many as fit :func:`cnnforge.deploy.runtime.prediction_batch_size`)."""
    session = open_session(onnx_model, provider=provider)
    batch_size = batch_size or prediction_batch_size(onnx_model)
    keras_top1 = keras_outputs(model, images, batch_size)[0].argmax(-1)
    onnx_top1 = onnx_outputs(session, to_layout(images, layout), batch_size)[0].argmax(-1)
    return AccuracyCheck.judge(
        data,
        len(labels),
        float(np.mean(keras_top1 == labels)),
        float(np.mean(onnx_top1 == labels)),
        max_drop_points,
    )
