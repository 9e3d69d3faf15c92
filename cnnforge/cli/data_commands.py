"""``cnnforge data``: a summary of a data source before anything trains."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from cnnforge.cli.options import data_options
from cnnforge.cli.output import console, write_json


def _with_data_options(fn):
    for option in reversed(data_options):
        fn = option(fn)
    return fn


@click.command("data")
@click.argument("source")
@_with_data_options
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the summary here.")
def data_command(
    source: str,
    image_size: str | None,
    resize: str,
    interpolation: str,
    strict_data: bool,
    json_out: Path | None,
) -> None:
    """What SOURCE (a folder, dir:FOLDER, FILE.npz or NAME[:PATH]) holds and how it would be
    read: classes and counts, image sizes and modes, skipped files, the size and resize policy
    used, and how long one epoch takes to read."""
    from cnnforge.core.preprocessing import Preprocessing, parse_size
    from cnnforge.data.folders import refuse_if_strict, skipped_summary
    from cnnforge.data.summary import summarize

    requested = Preprocessing(
        size=parse_size(image_size), policy=resize, interpolation=interpolation
    )
    summary = summarize(source, requested)
    refuse_if_strict(summary.skipped, strict_data)
    if summary.layout:
        console.print(escape(summary.layout))
    splits = list(summary.counts)
    table = Table("class", *splits, "total", box=None, pad_edge=False)
    for i, name in enumerate(summary.class_names):
        row = [summary.counts[s][i] for s in splits]
        table.add_row(escape(name), *map(str, row), str(sum(row)))
    console.print(table)
    totals = summary.class_totals
    ratio = (
        "a class has no images"
        if summary.imbalance is None
        else f"largest/smallest {summary.imbalance:.1f}"
    )
    flag = (
        f" [bold yellow]imbalanced[/] ({ratio}): consider --class-weight auto"
        if summary.imbalanced
        else ""
    )
    console.print(
        f"{summary.images} images, {len(summary.class_names)} classes, "
        f"{min(totals)}–{max(totals)} per class{flag}"
    )
    q = summary.size_quantiles
    if q:
        console.print(
            "sizes (min / 25% / median / 75% / max): width "
            + " / ".join(map(str, q["width"]))
            + ", height "
            + " / ".join(map(str, q["height"]))
        )
    if summary.longer_side_histogram:
        console.print(
            "longer side: "
            + ", ".join(f"{k}: {v}" for k, v in summary.longer_side_histogram.items())
        )
    if summary.modes:
        console.print("modes: " + ", ".join(f"{m} {n}" for m, n in summary.modes.items()))
    if summary.ignored:
        console.print("ignored: " + ", ".join(f"{n} {why}" for why, n in summary.ignored.items()))
    if summary.skipped:
        console.print(f"[yellow]{escape(skipped_summary(summary.skipped, show=5))}[/]")
    console.print(f"[bold]would read as[/] {summary.preprocessing.describe()}")
    if summary.epoch_read_s is not None:
        console.print(
            f"one epoch reads in about {summary.epoch_read_s:.1f} s "
            f"({summary.read_images_per_s:.0f} images/s in {summary.read_workers} "
            f"process{'es' if summary.read_workers != 1 else ''}, decode + resize, measured "
            "on a sample)"
        )
    else:
        console.print("held in memory: reading an epoch costs no decoding")
    if summary.disk_cache:
        console.print(f"disk cache of streamed images: {escape(summary.disk_cache)}")
    if json_out:
        write_json(json_out, summary.as_dict())
