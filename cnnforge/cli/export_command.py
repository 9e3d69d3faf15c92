"""``cnnforge export``: a run or a .keras model to ONNX, with its parity and accuracy checks."""

from __future__ import annotations

from pathlib import Path

import click

from cnnforge.cli.options import provider_choice
from cnnforge.cli.output import console, quiet_tensorflow
from cnnforge.core.contract import EXPORT_PRECISIONS, LAYOUTS
from cnnforge.deploy.triton import DEFAULT_MAX_BATCH as TRITON_MAX_BATCH


def calibration_summary(fitted: dict) -> str:
    """One line: the temperature, what it was fitted on, ECE before → after, the threshold."""
    cal, unknown = fitted["probability_calibration"], fitted["unknown_threshold"]
    smoothing = cal.get("label_smoothing", 0.0)
    undone = f" (the model's label smoothing {smoothing:g} taken off first)" if smoothing else ""
    return (
        f"temperature {cal['temperature']:.3f}{undone} fitted on {cal['images']} images "
        f"({cal['source']}): "
        f"ECE {cal['ece_before']:.2%} → {cal['ece_after']:.2%}, NLL {cal['nll_before']:.3f} → "
        f"{cal['nll_after']:.3f}; 'unknown' below {unknown['score']} (output "
        f"{unknown['output']}) {unknown['threshold']:.3f} "
        f"(accepts {unknown['acceptance']:.0%} of those images)"
    )


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Default: model.onnx beside the source (model-int8.onnx, model-nchw.onnx... "
    "for variants).",
)
@click.option(
    "--precision",
    type=click.Choice(EXPORT_PRECISIONS),
    default="fp32",
    show_default=True,
    help="fp16: half-precision weights and compute; int8: static "
    "QDQ quantization calibrated on training images.",
)
@click.option(
    "--layout",
    type=click.Choice([layout.lower() for layout in LAYOUTS], case_sensitive=False),
    default="nhwc",
    show_default=True,
    help="Input layout (nchw: channels first).",
)
@click.option("--opset", type=click.IntRange(min=9), default=17, show_default=True)
@click.option("--data", help="Dataset for parity, accuracy and calibration (default: the run's).")
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="POINTS",
    help="Refuse a variant losing more test accuracy than this, in percentage points.",
)
@click.option("--force", is_flag=True, help="Keep a variant that fails the accuracy gate.")
@click.option(
    "--calibration-images",
    type=click.IntRange(min=1),
    metavar="N",
    help="int8: training images to calibrate on  [default: 256, or all if fewer]",
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    help="Largest allowed |Keras - ONNX| probability  [default: 1e-4 fp32, 1e-2 fp16, "
    "not checked for int8]",
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1),
    metavar="FRACTION",
    help="Least top-1 agreement with Keras  [default: 0.999 fp32, 0.99 fp16, 0.95 int8]",
)
@click.option(
    "--provider",
    type=provider_choice(),
    default="cpu",
    show_default=True,
    help="Execution provider the checks run on (the deployment's).",
)
@click.option(
    "--trial",
    "trial_id",
    metavar="ID",
    help="Export this trial of the run (see `cnnforge trials`) instead of the best.",
)
@click.option(
    "--triton",
    "triton_dir",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Also write a Triton model repository: DIR/NAME/config.pbtxt, DIR/NAME/1/model.onnx, "
    "DIR/NAME/labels.txt (NAME: the .onnx file's stem).",
)
@click.option(
    "--triton-max-batch",
    type=click.IntRange(min=1),
    default=TRITON_MAX_BATCH,
    show_default=True,
    help="max_batch_size of the Triton config (the model's batch axis is open).",
)
@click.option(
    "--calibrate",
    is_flag=True,
    help="Fit a temperature on held-out labelled images and put it in the graph (calibrated "
    "probabilities, argmax unchanged), with an ood_score output and its threshold for "
    "'unknown'.",
)
def export(
    source: Path,
    output: Path | None,
    precision: str,
    layout: str,
    opset: int,
    data: str | None,
    max_accuracy_drop: float,
    force: bool,
    calibration_images: int | None,
    atol: float | None,
    min_agreement: float | None,
    provider: str,
    trial_id: str | None,
    triton_dir: Path | None,
    triton_max_batch: int,
    calibrate: bool,
) -> None:
    """Export a run directory or .keras file to ONNX; check parity and test accuracy."""
    quiet_tensorflow()
    from cnnforge.conversion.export import export as export_model
    from cnnforge.pipeline import export_trial

    options = {
        "opset": opset,
        "data": data,
        "precision": precision,
        "layout": layout,
        "atol": atol,
        "min_top1_agreement": min_agreement,
        "max_accuracy_drop": max_accuracy_drop,
        "force": force,
        "calibration_images": calibration_images,
        "provider": provider,
        "calibrate": calibrate,
    }
    if trial_id is None:
        result = export_model(source, output, **options)
    else:
        result = export_trial(source, trial_id, output, **options)
    console.print(
        f"wrote {result.onnx_path} ({result.size_bytes / 1e6:.2f} MB, {result.precision}, "
        f"{result.layout}, opset {result.opset}, converted in {result.seconds:.2f}s)",
        soft_wrap=True,
    )
    console.print(f"parity: {result.parity.summary()} → {result.parity_path}", soft_wrap=True)
    if result.accuracy is not None:
        console.print(f"accuracy: {result.accuracy.summary()}", soft_wrap=True)
    if result.calibration:
        console.print(f"calibration: {calibration_summary(result.calibration)}", soft_wrap=True)
    if triton_dir is not None:
        from cnnforge.deploy.triton import write_triton_repository

        folder = write_triton_repository(result.onnx_path, triton_dir, max_batch=triton_max_batch)
        console.print(f"Triton model repository: {folder}", soft_wrap=True)
