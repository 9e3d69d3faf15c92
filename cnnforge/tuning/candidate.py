"""What a search candidate costs where it will be deployed, measured before it is trained.

A candidate's fp32 latency does not depend on its trained weights, so each trial's model is
exported to ONNX in memory and timed with onnxruntime on the target provider and batch size
before a single epoch is spent. Its parameters, FLOPs per image and ONNX size are counted from
the same export. A candidate over a budget (``Budget``) is not trained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnforge.deploy import onnxinfo
from cnnforge.deploy.timing import (
    latency_stats,
    make_call,
    random_array,
    strict_session,
    time_calls,
)

# Short and robust: a few untimed calls, then the median of at least 30 calls or 0.2 s.
WARMUP_CALLS = 5
TIMED_CALLS = 30
MIN_TIMING_S = 0.2

# The measurements a budget can cap, with the SearchConfig field (and CLI option) that caps it.
LIMITS = {
    "latency_ms": "max_latency_ms",
    "params": "max_params",
    "flops": "max_flops",
    "size_mb": "max_size_mb",
}


@dataclass(frozen=True)
class Budget:
    """Upper limits on a candidate's deployment cost; None leaves a measurement unlimited."""

    max_latency_ms: float | None = None
    max_params: int | None = None
    max_flops: int | None = None
    max_size_mb: float | None = None

    def limits(self) -> dict[str, float]:
        """Measurement name → its limit, for the limits that are set."""
        return {
            name: getattr(self, field)
            for name, field in LIMITS.items()
            if getattr(self, field) is not None
        }

    def violations(self, measured: dict[str, Any]) -> list[str]:
        """Why ``measured`` is over budget (one phrase per limit it exceeds); empty if within."""
        return [
            f"{name} {_shown(measured[name])} > {_shown(limit)}"
            for name, limit in self.limits().items()
            if measured.get(name) is not None and measured[name] > limit
        ]


def _shown(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


@dataclass(frozen=True)
class Target:
    """Where latency is measured: the deployment's onnxruntime provider and batch size."""

    provider: str = "cpu"
    batch_size: int = 1


def measure_candidate(model: Any, target: Target) -> dict[str, float]:
    """Latency (median ms per call at ``target.batch_size``), parameters, FLOPs per image and
    ONNX size (MB) of an untrained Keras ``model``, and the seconds it took to find them."""
    from cnnforge.conversion.export import to_onnx

    start = time.perf_counter()
    proto = to_onnx(model)
    onnx_bytes = proto.SerializeToString()
    session = strict_session(onnx_bytes, target.provider, threads=None, spinning=None)
    image = session.get_inputs()[0]
    shape = (target.batch_size, *model.inputs[0].shape[1:])
    arrays = {image.name: random_array(np.random.default_rng(0), "float32", shape, (0, 255))}
    call = make_call(session, arrays, target.provider, io_binding=False, label="the candidate")
    seconds = time_calls(
        call, warmup=WARMUP_CALLS, iterations=TIMED_CALLS, min_duration_s=MIN_TIMING_S
    )
    return {
        "latency_ms": latency_stats(seconds)["p50"],
        "params": int(model.count_params()),
        "flops": onnxinfo.flops_per_image(proto),
        "size_mb": len(onnx_bytes) / 1e6,
        "measure_s": time.perf_counter() - start,
    }
