"""Keras vs onnxruntime on the same images: every mismatch gathered, per batch size.

Like Optimum's ``validate_model_outputs``, the check runs every case before judging, so a
failure reports each batch size's max difference rather than the first one that broke.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnforge.runtime import open_session, predict


@dataclass
class ParityCase:
    batch_size: int
    images: int
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float


@dataclass
class ParityReport:
    passed: bool
    atol: float
    inputs: str
    cases: list[ParityCase]
    batch_axis_dynamic: bool
    mismatches: list[str] = field(default_factory=list)
    opset: int | None = None

    def summary(self) -> str:
        if self.passed:
            worst = max(c.max_abs_diff for c in self.cases)
            agree = min(c.top1_agreement for c in self.cases)
            return f"max abs diff {worst:.2e} (atol {self.atol:g}), top-1 agreement {agree:.2%}"
        return "; ".join(self.mismatches)


def _keras_probabilities(model: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [
            np.asarray(model(images[i : i + batch_size], training=False))
            for i in range(0, len(images), batch_size)
        ]
    )


def check_parity(
    model: Any,
    onnx_model: bytes | str,
    images: np.ndarray,
    *,
    inputs: str,
    atol: float = 1e-4,
    batch_sizes: tuple[int, ...] = (1, 32),
    batch_one_images: int = 16,
) -> ParityReport:
    """Compare ``model`` (Keras) with ``onnx_model`` on ``images`` at each of ``batch_sizes``."""
    session = open_session(onnx_model)
    batch_dim = session.get_inputs()[0].shape[0]
    cases, mismatches = [], []
    for batch_size in batch_sizes:
        subset = images[:batch_one_images] if batch_size == 1 else images
        expected = _keras_probabilities(model, subset, batch_size)
        actual = predict(session, subset, batch_size)
        if actual.shape != expected.shape:
            mismatches.append(
                f"batch {batch_size}: ONNX output shape {actual.shape} != Keras {expected.shape}"
            )
            continue
        diff = np.abs(actual - expected)
        case = ParityCase(
            batch_size=batch_size,
            images=len(subset),
            max_abs_diff=float(diff.max()),
            max_rel_diff=float((diff / np.maximum(np.abs(expected), 1e-6)).max()),
            top1_agreement=float(np.mean(actual.argmax(1) == expected.argmax(1))),
        )
        cases.append(case)
        if case.max_abs_diff > atol:
            mismatches.append(
                f"batch {batch_size}: max abs diff {case.max_abs_diff:.3e} > atol {atol:g} "
                f"(top-1 agreement {case.top1_agreement:.2%})"
            )
    dynamic = isinstance(batch_dim, str) or batch_dim is None
    if not dynamic:
        mismatches.append(f"batch axis is fixed at {batch_dim}; it must be dynamic")
    return ParityReport(not mismatches, atol, inputs, cases, dynamic, mismatches)
