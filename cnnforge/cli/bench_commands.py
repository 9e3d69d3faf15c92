"""``cnnforge bench [run] MODEL...`` (time ONNX models) and ``cnnforge bench compare BASE NEW``
(the regression gate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cnnforge.cli.options import csv_ints
from cnnforge.cli.output import (
    console,
    err_console,
    print_bench,
    print_table,
    print_written,
    quiet_tensorflow,
)
from cnnforge.core.errors import CnnforgeError


class DefaultCommandGroup(click.Group):
    """A group that runs its default command when the first argument names no subcommand, so
    ``cnnforge bench MODEL...`` and ``cnnforge bench compare BASE NEW`` both work."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def _threads(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple | None:
    if value is None:
        return None
    counts: list[int | None] = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        if item == "default":
            counts.append(None)
        elif item.isdigit() and int(item) >= 1:
            counts.append(int(item))
        else:
            raise click.BadParameter(f"expected counts >= 1 or 'default', got {item!r}")
    return tuple(counts) or None


def _shapes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict | None:
    from cnnforge.bench.models import parse_shape

    try:
        return dict(parse_shape(v) for v in values) or None
    except CnnforgeError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group("bench", cls=DefaultCommandGroup)
def bench_group() -> None:
    """Time ONNX models with onnxruntime (bench MODEL...), or gate on a regression (bench compare)."""


@bench_group.command("run")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--batch-sizes",
    callback=csv_ints,
    help="e.g. 1,8,32 (default: 1,8,32, or the model's own fixed batch size).",
)
@click.option(
    "--threads",
    callback=_threads,
    metavar="N[,N...]",
    help="intra-op thread counts to sweep, e.g. 1,2,4 or default (onnxruntime's).",
)
@click.option(
    "--providers",
    "--provider",
    "providers",
    default="cpu",
    show_default=True,
    help="Comma-separated: cpu, cuda, tensorrt (cuda/tensorrt need onnxruntime-gpu).",
)
@click.option(
    "--spinning/--no-spinning",
    default=True,
    show_default=True,
    help="session.intra_op.allow_spinning: idle threads spin (lower latency, busy CPU).",
)
@click.option(
    "--io-binding",
    is_flag=True,
    help="Bind inputs and outputs on the device once, "
    "so GPU timings exclude host copies (default: session.run on host arrays).",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Untimed calls per cell.",
)
@click.option(
    "--min-iterations",
    "--iterations",
    "min_iterations",
    type=click.IntRange(min=2),
    default=100,
    show_default=True,
    help="Timed calls per cell, at least.",
)
@click.option(
    "--min-duration",
    "min_duration_s",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds of timed calls per cell, at least.",
)
@click.option(
    "--keras",
    "keras_model",
    type=click.Path(path_type=Path),
    help="Also time this .keras model (tf.function) in the same run.",
)
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    callback=_shapes,
    metavar="[NAME=]DIMS",
    help="What to feed a model that is not an image classifier: per-item dims such "
    "as 3x224x224 (repeat with NAME= for each input).",
)
@click.option("--no-peak", is_flag=True, help="Skip the MatMul peak microbenchmark.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results here.")
@click.option("--csv", "csv_out", type=click.Path(path_type=Path), help="Write a CSV table here.")
@click.option(
    "--markdown",
    "markdown_out",
    type=click.Path(path_type=Path),
    help="Write a Markdown table here.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Write bench.json, "
    "bench.csv, bench.md and the plots latency_vs_batch.png, latency_distribution.png here.",
)
def bench_run(
    models: tuple[Path, ...],
    providers: str,
    no_peak: bool,
    json_out: Path | None,
    csv_out: Path | None,
    markdown_out: Path | None,
    out_dir: Path | None,
    **settings: Any,
) -> None:
    """Time ONNX models: batch sizes × threads × providers × models, each cell with warm-up, a
    minimum of calls and of seconds, percentiles, the median's 95% interval, throughput, GFLOP/s
    and share of the machine's measured MatMul peak. Gate on a regression with
    `cnnforge bench compare BASE.json NEW.json --max-slowdown 10%`."""
    from cnnforge.bench.output import write_bench_files
    from cnnforge.bench.sweep import benchmark

    if settings["keras_model"]:
        quiet_tensorflow()
    names = tuple(p.strip() for p in providers.split(",") if p.strip())
    with console.status("measuring") as status:
        report = benchmark(
            list(models),
            providers=names,
            peak=not no_peak,
            progress=lambda message: status.update(message),
            **settings,
        )
    print_bench(report)
    print_written(
        write_bench_files(
            report,
            json_path=json_out,
            csv_path=csv_out,
            markdown_path=markdown_out,
            folder=out_dir,
        )
    )


@bench_group.command("compare")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option(
    "--max-slowdown",
    default="10%",
    show_default=True,
    help="Fail when a cell's median got slower than this, beyond its interval.",
)
@click.pass_context
def bench_compare(ctx: click.Context, base: Path, new: Path, max_slowdown: str) -> None:
    """Compare two bench JSON files cell by cell; exit 1 when a cell got slower than allowed.

    A cell fails only when the intervals of the medians say so: new low / base high exceeds
    1 + max slowdown (see docs/benchmarks.md)."""
    from cnnforge.bench.compare import (
        COMPARE_HEADERS,
        compare,
        comparison_rows,
        load_results,
        parse_slowdown,
    )

    threshold = parse_slowdown(max_slowdown)
    result = compare(load_results(base), load_results(new), threshold)
    print_table(COMPARE_HEADERS, comparison_rows(result), title="Medians (ms), new / base")
    if result.passed:
        console.print(f"[green]passed[/]: no cell slower than {threshold:.0%} beyond its interval")
        return
    err_console.print(
        f"[bold red]FAILED[/]: {len(result.slower)} cell(s) slower than "
        f"{threshold:.0%} beyond their intervals"
    )
    ctx.exit(1)
