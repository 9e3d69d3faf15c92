"""Timing onnxruntime calls: sessions on exactly one provider, the call to time (with or without
I/O binding), timed calls with the garbage collector off, and their statistics (percentiles and
a distribution-free interval for the median).

Shared by the benchmark and by the search's candidate cost (latency before training); imports no
TensorFlow.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cnnforge.core.contract import PROVIDERS
from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.runtime import open_session

CI_LEVEL = 0.95


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 / p99.9, mean, sample standard deviation, min and max, in ms."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("latency_stats needs at least one timing")
    p50, p90, p99, p999 = np.percentile(ms, [50, 90, 99, 99.9])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "p99.9": float(p999),
        "mean": float(ms.mean()),
        "std": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        "min": float(ms.min()),
        "max": float(ms.max()),
    }


def _binomial_half_cdf(n: int) -> np.ndarray:
    """P(B <= k) for k = 0..n, B ~ Binomial(n, 1/2), in log space so large n does not overflow."""
    k = np.arange(1, n + 1)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - k + 1) - np.log(k))])
    return np.minimum(np.cumsum(np.exp(log_comb - n * np.log(2.0))), 1.0)


def median_ci(samples: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float, float]:
    """A confidence interval for the median: ``(low, high, coverage)``, distribution-free.

    With n sorted samples x(1) ≤ … ≤ x(n), the interval [x(j), x(n+1-j)] holds the true median
    with probability 1 − 2·P(B ≤ j−1), B ~ Binomial(n, ½), whatever the distribution, for
    independent samples. j is the largest rank whose coverage is still ≥ ``level``. When n is too
    small for any (n < 6 at 95 %), the interval is [min, max] and ``coverage`` says what it is.
    Successive timings are not quite independent (caches, clocks, neighbours), so read it as the
    run-to-run noise of this run, not a guarantee about another day.
    """
    x = np.sort(np.asarray(samples, dtype=np.float64))
    if x.size == 0:
        raise ValueError("median_ci needs at least one sample")
    cdf = _binomial_half_cdf(x.size)
    ranks = np.nonzero(cdf <= (1 - level) / 2)[0]
    j = int(ranks[-1]) + 1 if ranks.size else 1
    return float(x[j - 1]), float(x[x.size - j]), float(1 - 2 * cdf[j - 1])


def time_calls(
    call: Callable[[], Any], *, warmup: int, iterations: int, min_duration_s: float = 0.0
) -> list[float]:
    """Seconds of each timed call of ``call``, after ``warmup`` untimed ones.

    Timing goes on until at least ``iterations`` calls and ``min_duration_s`` seconds are done.
    """
    for _ in range(warmup):
        call()
    times: list[float] = []
    collecting = gc.isenabled()
    gc.disable()
    try:
        first = end = time.perf_counter()
        while len(times) < iterations or end - first < min_duration_s:
            start = time.perf_counter()
            call()
            end = time.perf_counter()
            times.append(end - start)
    finally:
        if collecting:
            gc.enable()
    return times


def random_array(
    rng: np.random.Generator, dtype: str, shape: tuple[int, ...], value_range: tuple[float, float]
) -> np.ndarray:
    """Inputs to time with: floats uniform in ``value_range``; unsigned ints 0–255; signed ints
    0–99 (valid token ids and indices for most models); booleans half true."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        return rng.uniform(*value_range, shape).astype(dtype)
    if kind == "u":
        return rng.integers(0, 256, shape).astype(dtype)
    if kind == "i":
        return rng.integers(0, 100, shape).astype(dtype)
    if kind == "b":
        return rng.random(shape) < 0.5
    raise CnnforgeError(f"cannot make inputs of dtype {dtype}; cnnforge bench feeds numbers only")


def strict_session(model: bytes | str, provider: str, threads: int | None, spinning: bool) -> Any:
    """A session on exactly ``provider``: onnxruntime's silent fallback to the CPU is an error,
    since timings of another provider would be reported under this one's name."""
    session = open_session(model, provider=provider, threads=threads, spinning=spinning)
    used = session.get_providers()[0]
    if used != PROVIDERS[provider]:
        raise CnnforgeError(
            f"onnxruntime fell back to {used}: {provider} could not start (check the GPU driver "
            f"and the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs), or drop {provider}"
        )
    return session


def _device(provider: str) -> str:
    return "cpu" if provider == "cpu" else "cuda"


def make_call(
    session: Any, arrays: dict[str, np.ndarray], provider: str, io_binding: bool, label: str
) -> Callable[[], Any]:
    """The call to time. Runs once first, so a shape that does not fit is an error, not a timing.

    Without I/O binding it is ``session.run`` on host arrays: on a GPU the timing includes the
    host→device and device→host copies. With I/O binding, inputs are copied to the provider's
    device once and outputs go to preallocated buffers there: the timing excludes host copies.
    """
    try:
        outputs = session.run(None, arrays)
    except Exception as exc:  # onnxruntime raises its own types (InvalidArgument, Fail, ...)
        shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in arrays.items())
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CnnforgeError(
            f"{label} does not run on {shapes} ({reason}); check --batch-sizes and --shape"
        ) from None
    if not io_binding:
        return lambda: session.run(None, arrays)
    import onnxruntime as ort

    device = _device(provider)
    binding = session.io_binding()
    kept = []  # OrtValues on the CPU wrap numpy memory: keep them alive with the call
    for name, array in arrays.items():
        kept.append(ort.OrtValue.ortvalue_from_numpy(array, device, 0))
        binding.bind_ortvalue_input(name, kept[-1])
    for meta, out in zip(session.get_outputs(), outputs, strict=True):
        kept.append(ort.OrtValue.ortvalue_from_shape_and_type(out.shape, out.dtype, device, 0))
        binding.bind_ortvalue_output(meta.name, kept[-1])
    return lambda kept=kept: session.run_with_iobinding(binding)
