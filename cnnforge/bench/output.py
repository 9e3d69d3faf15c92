"""Bench results as a table, CSV, Markdown and plots, and :func:`write_bench_files`, the one way
to write them to disk. Reads the JSON rows of :func:`cnnforge.bench.results.results_as_json` (so a
``bench.json`` from an earlier run works too) and never measures. matplotlib is imported inside
the plotting functions, with the Agg backend."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnforge.bench.results import KERAS, BenchReport, BenchResult, best_threads, results_as_json
from cnnforge.core.atomic import atomic_path, atomic_write_text
from cnnforge.core.markdown import markdown_table

TABLE_HEADERS = [
    "runtime",
    "model",
    "threads",
    "batch",
    "p50 ms",
    "p50 95% CI",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "images/s",
    "GFLOP/s",
    "of peak",
    "× Keras",
    "runs",
]
CSV_COLUMNS = [
    "runtime",
    "model",
    "model_path",
    "provider",
    "batch_size",
    "threads",
    "spinning",
    "io_binding",
    "warmup",
    "iterations",
    "duration_s",
    "p50_ms",
    "p50_ci_low_ms",
    "p50_ci_high_ms",
    "ci_coverage",
    "p90_ms",
    "p99_ms",
    "p99.9_ms",
    "mean_ms",
    "std_ms",
    "min_ms",
    "max_ms",
    "throughput",
    "gflops",
    "peak_gflops",
    "peak_share",
    "speedup_vs_keras",
]


def number(value: float | None, digits: int = 3) -> str:
    """A latency or rate with ``digits`` significant digits, no exponent for everyday sizes."""
    if value is None:
        return ""
    if value == 0 or 1e-3 <= abs(value) < 1e7:
        decimals = max(0, digits - 1 - int(f"{abs(value):e}".split("e")[1]))
        return f"{value:.{decimals}f}"
    return f"{value:.{digits - 1}e}"


def _runtime(row: dict[str, Any]) -> str:
    if row["runtime"] == KERAS:
        return KERAS
    extra = ", I/O binding" if row.get("io_binding") else ""
    return f"onnxruntime {row['provider']}{extra}"


def _cells(row: dict[str, Any]) -> dict[str, str]:
    lat = row["latency_ms"]
    ci = row.get("p50_ci_ms")
    share = row.get("peak_share")
    speedup = row.get("speedup_vs_keras")
    values = [
        _runtime(row),
        row["model"],
        "default" if row["threads"] is None else str(row["threads"]),
        str(row["batch_size"]),
        number(lat["p50"]),
        f"{number(ci[0])}–{number(ci[1])}" if ci else "",
        number(lat["p90"]),
        number(lat["p99"]),
        number(lat.get("p99.9")),
        f"{row['throughput']:.0f}",
        number(row.get("gflops")),
        f"{share:.1%}" if share is not None else "",
        f"{speedup:.2f}×" if speedup is not None else "",
        str(row["iterations"]),
    ]
    return dict(zip(TABLE_HEADERS, values, strict=True))


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One line per result, formatted for a person: the columns of ``TABLE_HEADERS``."""
    return [list(_cells(row).values()) for row in rows]


# A terminal table per model and runtime: the columns that vary, under short names.
COMPACT_HEADERS = {
    "threads": "threads",
    "batch": "batch",
    "p50 ms": "p50",
    "p50 95% CI": "95% CI",
    "p90 ms": "p90",
    "p99 ms": "p99",
    "p99.9 ms": "p99.9",
    "images/s": "img/s",
    "GFLOP/s": "GFLOP/s",
    "of peak": "peak",
    "× Keras": "×Keras",
}


def compact_tables(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) per model and runtime, narrow enough for an 80-column terminal:
    latencies in ms, and columns that are empty throughout left out."""
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        cells = _cells(row)
        groups.setdefault(f"{cells['model']}: {cells['runtime']} (ms)", []).append(cells)
    tables = []
    for title, group in groups.items():
        keep = [h for h in COMPACT_HEADERS if any(cells[h] for cells in group)]
        tables.append(
            (
                title,
                [COMPACT_HEADERS[h] for h in keep],
                [[cells[h] for h in keep] for cells in group],
            )
        )
    return tables


def best_thread_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Per model, provider, batch size: the fastest thread count, where several were timed."""
    return [
        [
            b["model"],
            b["provider"],
            str(b["batch_size"]),
            "default" if b["threads"] is None else str(b["threads"]),
            number(b["p50_ms"]),
            "yes" if b["clear"] else "no (intervals overlap)",
        ]
        for b in best_threads(list(rows))
        if b["compared"] > 1
    ]


BEST_HEADERS = ["model", "provider", "batch", "best threads", "p50 ms", "clearly fastest"]


def describe_setup(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Sentences on the machine, the method and the measured peaks, from the first row."""
    env, sweep = rows[0]["environment"], rows[0].get("sweep", {})
    load = env.get("load_average_before")
    lines = [
        f"{env['cpu']}, {env['cores']} cores ({env.get('usable_cores', env['cores'])} usable), "
        f"onnxruntime {env['onnxruntime']}, measured {env.get('measured_at', '?')}"
        + (
            f", load average {load[0]} before, {env['load_average_after'][0]} after"
            if load and env.get("load_average_after")
            else ""
        ),
    ]
    if sweep:
        lines.append(
            f"Each cell: {sweep['warmup']} warm-up calls, then at least {sweep['min_iterations']} "
            f"timed calls and {sweep['min_duration_s']:g} s; spinning "
            f"{'on' if sweep['spinning'] else 'off'}; p50 interval: {sweep['ci']}."
        )
        lines += [f"Peak: {p['gflops']:.1f} GFLOP/s ({p['what']})." for p in sweep.get("peaks", [])]
    return lines


def _render_json(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)


def render_markdown(rows: Sequence[dict[str, Any]]) -> str:
    out = [
        "# cnnforge bench",
        "",
        *describe_setup(rows),
        "",
        markdown_table(TABLE_HEADERS, table_rows(rows)),
    ]
    best = best_thread_rows(rows)
    if best:
        out += ["", "## Best thread count", "", markdown_table(BEST_HEADERS, best)]
    return "\n".join(out) + "\n"


def render_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {key: row.get(key) for key in CSV_COLUMNS}
        flat.update({f"{k}_ms": v for k, v in row["latency_ms"].items()})
        low, high = row.get("p50_ci_ms") or (None, None)
        flat.update(p50_ci_low_ms=low, p50_ci_high_ms=high)
        writer.writerow(flat)
    return buffer.getvalue()


def _series(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        threads = "" if row["runtime"] == KERAS else f", threads {row['threads'] or 'default'}"
        label = f"{row['model']}: {_runtime(row)}{threads}"
        series.setdefault(label, []).append(row)
    return {k: sorted(v, key=lambda r: r["batch_size"]) for k, v in series.items()}


def plot_latency_vs_batch(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Median latency (with its interval) and throughput against batch size, one line per
    model / provider / thread count, Keras dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    for label, cells in _series(rows).items():
        batches = [c["batch_size"] for c in cells]
        p50 = [c["latency_ms"]["p50"] for c in cells]
        ci = [c.get("p50_ci_ms") or [c["latency_ms"]["p50"]] * 2 for c in cells]
        errors = [
            [m - lo for m, (lo, _) in zip(p50, ci, strict=True)],
            [hi - m for m, (_, hi) in zip(p50, ci, strict=True)],
        ]
        style = "--" if cells[0]["runtime"] == KERAS else "-"
        left.errorbar(batches, p50, yerr=errors, fmt="o" + style, capsize=3, label=label)
        right.plot(batches, [c["throughput"] for c in cells], "o" + style, label=label)
    for axis, ylabel, title in (
        (left, "median latency per call (ms)", "Latency (bars: 95% interval of the median)"),
        (right, "images per second", "Throughput (batch / mean latency)"),
    ):
        axis.set(xscale="log", yscale="log", xlabel="batch size", ylabel=ylabel, title=title)
        batches = sorted({r["batch_size"] for r in rows})
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.minorticks_off()
        axis.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axis.grid(True, which="major", alpha=0.3)
    left.legend(fontsize=8)
    env = rows[0]["environment"]
    fig.suptitle(f"cnnforge bench: {env['cpu']}, onnxruntime {env['onnxruntime']}", fontsize=10)
    return _save(fig, path)


def plot_distribution(result: BenchResult, path: Path) -> Path:
    """One cell's timings: a histogram with its percentiles, and every call in order (drift,
    spikes and neighbours show up there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    samples = np.asarray(result.samples_ms)
    stats = result.latency_ms
    fig, (hist, trace) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    shown = samples[samples <= stats["p99.9"]] if len(samples) > 1 else samples
    bins: Any = min(80, max(10, len(shown) // 20))
    spread = shown.max() / shown.min() > 10 if shown.min() > 0 else False
    if spread:  # stalls far from the typical call: log-spaced bins keep both readable
        bins = np.geomspace(shown.min(), shown.max(), bins + 1)
        hist.set_xscale("log")
    hist.hist(shown, bins=bins, color="tab:blue", alpha=0.7)
    hist.axvspan(*result.p50_ci_ms, color="tab:green", alpha=0.25, label="95% interval of p50")
    for key, color in (
        ("p50", "tab:green"),
        ("p90", "tab:orange"),
        ("p99", "tab:red"),
        ("p99.9", "tab:purple"),
    ):
        hist.axvline(stats[key], color=color, label=f"{key} {number(stats[key])} ms")
    hist.set(
        xlabel="latency (ms, log scale)" if spread else "latency (ms)",
        yscale="log",
        ylabel="calls (log scale)",
        title=f"{len(samples)} calls ({len(samples) - len(shown)} above p99.9 not drawn)",
    )
    hist.legend(fontsize=8)
    trace.plot(np.arange(len(samples)), samples, ".", markersize=2, alpha=0.5)
    trace.axhline(stats["p50"], color="tab:green", label="p50")
    trace.set(
        xlabel="call", ylabel="latency (ms)", yscale="log", title="Every timed call, in order"
    )
    trace.legend(fontsize=8)
    threads = "default" if result.threads is None else result.threads
    fig.suptitle(
        f"{result.model}: {result.runtime} {result.provider}, threads {threads}, "
        f"batch {result.batch_size}",
        fontsize=10,
    )
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def distribution_cell(report: BenchReport) -> BenchResult:
    """The cell whose distribution is drawn: the first model and provider at its smallest batch
    size, at that batch size's fastest thread count."""
    first = report.results[0]
    candidates = [
        r
        for r in report.results
        if (r.model, r.provider, r.batch_size) == (first.model, first.provider, first.batch_size)
    ]
    return min(candidates, key=lambda r: r.latency_ms["p50"])


# The text files of a benchmark: how each is rendered from the JSON rows, and its name in a folder.
_TEXT_FILES = {
    "json": (_render_json, "bench.json"),
    "csv": (render_csv, "bench.csv"),
    "markdown": (render_markdown, "bench.md"),
}


def _write_text_files(rows: list[dict[str, Any]], paths: dict[str, Path | None]) -> dict[str, Path]:
    """Each text file (``_TEXT_FILES``) that has a path, written atomically."""
    written = {}
    for kind, path in paths.items():
        if path is not None:
            atomic_write_text(path, _TEXT_FILES[kind][0](rows))
            written[kind] = Path(path)
    return written


def write_outputs(report: BenchReport, folder: Path) -> dict[str, Path]:
    """bench.json, bench.csv, bench.md and the two plots, in ``folder``."""
    folder = Path(folder)
    rows = results_as_json(report)
    written = _write_text_files(rows, {k: folder / name for k, (_, name) in _TEXT_FILES.items()})
    written["latency plot"] = plot_latency_vs_batch(rows, folder / "latency_vs_batch.png")
    written["distribution plot"] = plot_distribution(
        distribution_cell(report), folder / "latency_distribution.png"
    )
    return written


def write_bench_files(
    report: BenchReport,
    *,
    json_path: Path | None = None,
    csv_path: Path | None = None,
    markdown_path: Path | None = None,
    folder: Path | None = None,
) -> list[Path]:
    """Write a benchmark's results, each file atomically (a reader never sees half a file):
    the JSON rows, the CSV table and the Markdown page at the paths given, and with
    ``folder`` all of :func:`write_outputs`. The paths written, in that order."""
    paths = {"json": json_path, "csv": csv_path, "markdown": markdown_path}
    written = list(_write_text_files(results_as_json(report), paths).values())
    if folder is not None:
        written += write_outputs(report, folder).values()
    return written
