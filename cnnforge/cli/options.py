"""Option callbacks shared by several commands, and the options that define a search (shared by
``search`` and ``run``, each with its own defaults)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cnnforge.core.contract import PROVIDERS, TRAINING_PRECISIONS, TUNERS
from cnnforge.core.errors import CnnforgeError
from cnnforge.core.preprocessing import INTERPOLATIONS, RESIZE_POLICIES

if TYPE_CHECKING:
    from cnnforge.tuning.config import SearchConfig


def csv_ints(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, ...] | None:
    """``1,8,32`` as ``(1, 8, 32)``: positive integers."""
    if value is None:
        return None
    try:
        numbers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return numbers


def assignments(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """Repeated ``NAME=VALUE`` as ``{NAME: VALUE}``."""
    parsed = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}")
        parsed[name] = value
    return parsed


def duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """``30m``, ``1h`` ... as seconds."""
    from cnnforge.core.durations import parse_duration

    try:
        return None if value is None else parse_duration(value)
    except CnnforgeError as exc:
        raise click.BadParameter(str(exc)) from None


def provider_choice() -> click.Choice:
    """The onnxruntime providers by their short names (cpu, cuda, tensorrt)."""
    return click.Choice(list(PROVIDERS))


def unknown_options(command: Callable) -> Callable:
    """``--reject-unknown`` and ``--min-confidence``: predict's and serve's "not one of the
    classes" answer."""
    command = click.option(
        "--min-confidence",
        type=float,
        metavar="P",
        help="Answer 'unknown' where the top probability is below P (0 to 1).",
    )(command)
    return click.option(
        "--reject-unknown",
        is_flag=True,
        help="Answer 'unknown' below the threshold of the score the model records "
        "(export --calibrate: its ood_score output).",
    )(command)


# Each candidate is measured with onnxruntime before training; these cap what it may cost.
_budget_options = [
    click.option(
        "--max-latency-ms",
        type=click.FloatRange(min=0, min_open=True),
        metavar="MS",
        help="Refuse (do not train) candidates slower than this per call.",
    ),
    click.option(
        "--max-params",
        type=click.IntRange(min=1),
        metavar="N",
        help="Refuse candidates with more parameters.",
    ),
    click.option(
        "--max-flops",
        type=click.IntRange(min=1),
        metavar="N",
        help="Refuse candidates with more FLOPs per image.",
    ),
    click.option(
        "--max-size-mb",
        type=click.FloatRange(min=0, min_open=True),
        metavar="MB",
        help="Refuse candidates whose ONNX file is larger.",
    ),
    click.option(
        "--latency-batch-size",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Batch size candidates are timed at.",
    ),
    click.option(
        "--latency-provider",
        type=provider_choice(),
        default="cpu",
        show_default=True,
        help="onnxruntime provider candidates are timed on.",
    ),
]


# How image files become the model's input; shared by search, run and data.
data_options = [
    click.option(
        "--image-size",
        metavar="N|HxW",
        help="Size images are brought to [default: chosen from the data: the median size, the "
        "longer side at most 128].",
    ),
    click.option(
        "--resize",
        type=click.Choice(RESIZE_POLICIES),
        default="stretch",
        show_default=True,
        help="stretch to the size, crop the centre to its aspect ratio, or pad (letterbox).",
    ),
    click.option(
        "--interpolation",
        type=click.Choice(INTERPOLATIONS),
        default="bilinear",
        show_default=True,
    ),
    click.option(
        "--strict-data",
        is_flag=True,
        help="An unreadable image is an error (default: skipped, with a warning).",
    ),
]


def search_options(defaults: dict[str, Any]) -> Callable[[Callable], Callable]:
    """The options that define a search, shared by ``search`` and ``run`` with their defaults."""
    options = [
        click.option(
            "--data",
            default=defaults["data"],
            show_default=True,
            help="NAME, NAME:PATH, dir:FOLDER or FILE.npz.",
        ),
        click.option("--arch", help=f"Architecture plugin [default: {defaults['arch']}]."),
        click.option(
            "--backbone",
            metavar="NAME|run:PATH",
            help="Transfer learning from a backbone plugin, or from a run directory or "
            ".keras model (instead of --arch).",
        ),
        click.option(
            "--weights",
            metavar="imagenet|none|PATH",
            help="Backbone weights: imagenet (the default; keras downloads them once), "
            "none, or a local weights file.",
        ),
        click.option(
            "--run-dir",
            type=click.Path(path_type=Path),
            default=defaults["run_dir"],
            show_default=True,
            help="Where the run's artifacts go; rerun to resume.",
        ),
        click.option(
            "--tuner",
            type=click.Choice(TUNERS),
            default=defaults["tuner"],
            show_default=True,
        ),
        click.option(
            "--max-trials",
            type=click.IntRange(min=1),
            help="Trials at most  [default: auto: as the time budget's plan holds; other "
            "tuners: 10].",
        ),
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            help="Epochs per trial (auto: of its top rung; Hyperband: the most a trial gets)  "
            "[default: auto: planned; other tuners: 10].",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            help="[default: 128, or less where that leaves under 50 steps an epoch]",
        ),
        click.option(
            "--objective",
            default="val_accuracy",
            show_default=True,
            help="Metric to optimise; names with 'loss' are minimised.",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--patience",
            type=click.IntRange(min=0),
            default=defaults["patience"],
            show_default=True,
            help="Early-stopping patience in epochs (0: off); not applied to a trial "
            "whose learning rate follows a schedule (cosine does its best at its end).",
        ),
        click.option(
            "--fix",
            multiple=True,
            callback=assignments,
            metavar="NAME=VALUE",
            help="Pin a hyperparameter (repeatable).",
        ),
        click.option(
            "--space",
            multiple=True,
            callback=assignments,
            metavar="NAME=V1,V2",
            help="Narrow a hyperparameter to these values (repeatable).",
        ),
        click.option(
            "--strategy",
            type=click.Choice(["mirrored"]),
            help="Train each trial on all local GPUs (tf.distribute.MirroredStrategy).",
        ),
        click.option(
            "--time-budget",
            callback=duration,
            metavar="DURATION",
            help="Wall time for the whole job, final training included (e.g. 30m, 1h): "
            "the auto search plans its trials and final training to fill it; others stop "
            "trials in time for the final training  [default: auto without --max-trials or "
            "--epochs: 4m30s].",
        ),
        click.option(
            "--retrain/--no-retrain",
            default=True,
            show_default=True,
            help="Train the best trial again on train+validation for the epochs it "
            "took to its best.",
        ),
        click.option(
            "--search-fraction",
            type=click.FloatRange(0, 1, min_open=True),
            default=1.0,
            show_default=True,
            help="Share of the training images each trial trains on (stratified).",
        ),
        click.option(
            "--deterministic",
            is_flag=True,
            help="Bit-for-bit repeatable training for a seed (TensorFlow's "
            "deterministic ops; slower).",
        ),
        click.option(
            "--precision",
            type=click.Choice(TRAINING_PRECISIONS),
            default="auto",
            show_default=True,
            help="Training precision; auto: mixed float16 on a GPU, float32 on a CPU.",
        ),
        click.option(
            "--track",
            multiple=True,
            metavar="tensorboard|mlflow|none",
            help="Log the trials to TensorBoard and/or MLflow (repeatable or comma-separated; "
            "MLflow needs cnnforge[mlflow])  [default: tensorboard; a resume: as before].",
        ),
        *data_options,
        click.option(
            "--class-weight",
            type=click.Choice(["auto"]),
            help="auto: weight each class inversely to its share of the training images "
            "(for imbalanced classes).",
        ),
        *_budget_options,
    ]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def search_config(options: dict[str, Any]) -> SearchConfig:
    """The search the options describe; flags that do not go together are a usage error."""
    from cnnforge.tuning.config import SearchConfig

    try:
        return SearchConfig.from_options(options)
    except CnnforgeError as exc:
        raise click.UsageError(str(exc)) from None
