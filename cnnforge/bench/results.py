"""What a benchmark measured, as plain data: one ``BenchResult`` per cell, the machine's
``Peak``, the whole ``BenchReport``, its JSON rows, and how long each cell is timed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cnnforge.bench.models import BenchModel
from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.timing import latency_stats, median_ci, time_calls

CI_METHOD = "distribution-free order-statistic interval (binomial), 95%"
ONNXRUNTIME = "onnxruntime"
KERAS = "keras tf.function"
# The kind of device each onnxruntime provider runs on: a cell is compared with a Keras baseline
# that TensorFlow ran on the same kind.
DEVICE_KINDS = {"cpu": "cpu", "cuda": "gpu", "tensorrt": "gpu"}


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


def make_result(
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
