"""Keras vs onnxruntime on the same images: every mismatch gathered, per batch size and output;
and the accuracy gate that decides whether a reduced-precision variant is worth keeping.

Like Optimum's ``validate_model_outputs``, the check runs every case before judging, so a
failure reports each batch size's and each output's difference rather than the first that broke.

What "the same answers" means depends on the precision (the tolerances export uses):

- float32: every probability within ``atol`` (1e-4) of Keras.
- float16: every probability within ``atol`` (1e-2): half precision keeps about three
  significant digits, and the probabilities of a small CNN moved by < 1e-3 here.
- int8: probabilities move by several hundredths by design, so no element-wise bound is
  meaningful. The check is top-1 agreement with Keras (``min_top1_agreement``, 0.95) per batch
  size, and the accuracy gate on the whole test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnforge.core.contract import OUTPUT_NAME
from cnnforge.deploy.runtime import open_session, to_layout


@dataclass
class ParityCase:
    batch_size: int
    images: int
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float
    output: str = OUTPUT_NAME


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
            f" (at least {self.min_top1_agreement:.0%})"
            if self.min_top1_agreement is not None
            else ""
        )
        return f"max abs diff {worst:.2e}{bound}, top-1 agreement {agree:.2%}{floor}"


def _as_list(outputs: Any) -> list[np.ndarray]:
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return [np.asarray(o) for o in outputs]


def keras_outputs(model: Any, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Every output of the Keras model on ``images`` (NHWC), ``batch_size`` at a time."""
    batches = [
        _as_list(model(images[i : i + batch_size], training=False))
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
    )


def _judge(case: ParityCase, atol: float | None, min_agreement: float | None) -> list[str]:
    where = f"batch {case.batch_size}, {case.output}"
    problems = []
    if atol is not None and case.max_abs_diff > atol:
        problems.append(
            f"{where}: max abs diff {case.max_abs_diff:.3e} > atol {atol:g} "
            f"(top-1 agreement {case.top1_agreement:.2%})"
        )
    if min_agreement is not None and case.top1_agreement < min_agreement:
        problems.append(
            f"{where}: top-1 agreement {case.top1_agreement:.2%} < {min_agreement:.0%} "
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
    batch_size: int = 256,
) -> AccuracyCheck:
    """Accuracy of Keras and of onnxruntime on the same labelled images (NHWC)."""
    session = open_session(onnx_model, provider=provider)
    keras_top1 = keras_outputs(model, images, batch_size)[0].argmax(-1)
    onnx_top1 = onnx_outputs(session, to_layout(images, layout), batch_size)[0].argmax(-1)
    return AccuracyCheck.judge(
        data,
        len(labels),
        float(np.mean(keras_top1 == labels)),
        float(np.mean(onnx_top1 == labels)),
        max_drop_points,
    )
