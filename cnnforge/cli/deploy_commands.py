"""What works on an exported ONNX model with onnxruntime alone: ``cnnforge inspect``,
``cnnforge predict`` and ``cnnforge evaluate``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from cnnforge.cli.options import provider_choice, unknown_options
from cnnforge.cli.output import console, write_json


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Dataset whose test split to score on.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the scores here.")
def evaluate(model: Path, data: str, json_out: Path | None) -> None:
    """Accuracy, per-class precision/recall and calibration of an ONNX model, with onnxruntime."""
    from cnnforge.evaluation.evaluate import evaluate as run_evaluate

    result = run_evaluate(model, data)
    table = Table("class", "precision", "recall", "images", box=None, pad_edge=False)
    for c in result.per_class:
        table.add_row(c.name, f"{c.precision:.3f}", f"{c.recall:.3f}", str(c.support))
    console.print(table)
    console.print(
        f"[bold]accuracy {result.accuracy:.2%}[/] on {result.images} test images of {data}"
    )
    selective = ", ".join(f"{a:.2%} at {c} coverage" for c, a in result.selective_accuracy.items())
    console.print(
        f"calibration: ECE {result.ece:.2%} (15 bins), NLL {result.nll:.4f}, Brier "
        f"{result.brier:.4f}; selective accuracy {selective}",
        soft_wrap=True,
    )
    if json_out:
        write_json(json_out, asdict(result))


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the facts here.")
def inspect_command(model: Path, json_out: Path | None) -> None:
    """Inputs, outputs, opset, operators, parameters, FLOPs, size and metadata of an ONNX model."""
    from cnnforge.deploy.inspect import inspect_model

    info = inspect_model(model)
    facts = Table(box=None, pad_edge=False, show_header=False)
    facts.add_row("file", escape(f"{info.path} ({info.size_bytes / 1e6:.3f} MB)"))
    facts.add_row("producer", f"{info.producer or '?'}, opset {info.opset}, IR {info.ir_version}")
    for label, tensors in (("input", info.inputs), ("output", info.outputs)):
        for t in tensors:
            shape = ", ".join("?" if d is None else str(d) for d in t.shape)
            facts.add_row(label, escape(f"{t.name}: {t.dtype} [{shape}]"))
    by_type = ", ".join(f"{n:,} {dtype}" for dtype, n in info.parameters_by_type.items())
    facts.add_row("parameters", f"{info.parameters:,}" + (f" ({by_type})" if by_type else ""))
    flops = "unknown" if info.flops_per_image is None else f"{info.flops_per_image / 1e6:,.2f} M"
    facts.add_row("FLOPs/image", flops)
    facts.add_row("operators", ", ".join(f"{op} {n}" for op, n in info.operators.items()))
    console.print(facts)
    _print_metadata(info.metadata, info.other_metadata)
    if json_out:
        write_json(json_out, asdict(info))


def _print_metadata(ours: dict[str, Any], others: dict[str, str]) -> None:
    """cnnforge's metadata in words (accuracy, class names), then any other keys as they are."""
    if not ours:
        console.print("[yellow]no cnnforge metadata[/] (not exported by cnnforge)")
    table = Table("metadata", "value", box=None, pad_edge=False)
    for key, value in ours.items():
        if key == "accuracy" and isinstance(value, dict):
            value = (
                f"{value['onnxruntime']:.2%} (Keras {value['keras']:.2%}) on {value['images']} "
                f"{value.get('split', 'test')} images of {value['data']}"
                + (" [forced past the gate]" if value.get("forced") else "")
            )
        elif key == "class_names" and isinstance(value, list):
            value = f"{len(value)}: " + ", ".join(map(str, value))
        table.add_row(key, escape(value if isinstance(value, str) else json.dumps(value)))
    for key, value in others.items():
        table.add_row(escape(key), escape(value))
    if ours or others:
        console.print(table)


@click.command("predict")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--provider", type=provider_choice(), default="cpu", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the labels here.")
@unknown_options
def predict_command(
    model: Path,
    images: tuple[Path, ...],
    top_k: int,
    provider: str,
    json_out: Path | None,
    reject_unknown: bool,
    min_confidence: float | None,
) -> None:
    """Top-k labels of IMAGE files with onnxruntime alone (no TensorFlow)."""
    from cnnforge.deploy.predict import Classifier

    classifier = Classifier(
        model, provider=provider, reject_unknown=reject_unknown, min_confidence=min_confidence
    )
    predictions = classifier.predict(list(images), top_k)
    table = Table("image", "label", "probability", box=None, pad_edge=False)
    for prediction in predictions:
        if prediction.unknown:
            below = f"{prediction.score} {prediction.score_value:.4f} < {prediction.threshold:.4f}"
            table.add_row(escape(prediction.image), "[yellow]unknown[/]", below)
        for rank, (label, probability) in enumerate(prediction.top):
            image = escape(prediction.image) if rank == 0 and not prediction.unknown else ""
            table.add_row(image, escape(label), f"{probability:.4f}")
    console.print(table)
    if json_out:
        write_json(json_out, [p.as_dict() for p in predictions])
