"""``cnnforge report`` (rebuild a run's reports) and ``cnnforge explain`` (a model's filters and
feature maps on an image)."""

from __future__ import annotations

from pathlib import Path

import click

from cnnforge.cli.output import console, err_console, print_written, quiet_tensorflow


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Rebuild report.md and report.html (figures, sortable trials) of a run directory."""
    quiet_tensorflow()
    from cnnforge.report.reports import write_reports

    written = write_reports(run_dir)
    print_written([written.markdown, written.html])
    for missing in written.missing:
        err_console.print(
            f"[yellow]missing {missing.file}:[/] {missing.consequence}; {missing.remedy}",
            soft_wrap=True,
        )


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("image", type=click.Path(path_type=Path))
@click.option(
    "--layers",
    help="Comma-separated layer names (default: the conv layers, or a "
    "representative subset of a deep model's).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="PNG to write (default: IMAGE-explained.png beside the image).",
)
def explain(model: Path, image: Path, layers: str | None, output: Path | None) -> None:
    """Draw a model's first-layer filters and its feature maps for IMAGE (MODEL: .keras or run)."""
    quiet_tensorflow()
    from cnnforge.report.explain import explain as run_explain

    names = [n.strip() for n in layers.split(",") if n.strip()] if layers else None
    result = run_explain(model, image, output, layers=names)
    for note in result.explanation.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    for entry in result.explanation.feature_maps:
        layer = entry.layer
        console.print(
            f"  {layer.path:<28} {layer.kind:<20} {layer.filters:>5} maps  "
            f"output {'×'.join(map(str, layer.output_shape))}"
        )
    name, probability = result.explanation.prediction or ("?", 0.0)
    console.print(f"predicted: {name} ({probability:.1%})\nwrote {result.figure}")
