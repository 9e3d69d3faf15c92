"""The ``cnnforge`` command: parse, call the Python API, print. TensorFlow is imported lazily,
inside the commands that need it, so ``--help`` and ``plugins list`` stay instant."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cnnforge import registry
from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.core.objectives import higher_is_better

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", module=r"(keras|tensorflow|tf2onnx|google)(\..*)?")


def _show_warning(fallback: Callable, message: Any, category: type, *args: Any) -> None:
    """cnnforge's warnings as one yellow line on stderr; other warnings as Python shows them."""
    if issubclass(category, CnnforgeWarning):
        err_console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)
    else:
        fallback(message, category, *args)


class CnnforgeGroup(click.Group):
    """Turns user errors into one line and a non-zero exit; tracebacks only under --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CnnforgeWarning)
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except CnnforgeError as exc:
            self._fail(ctx, str(exc))
        except KeyboardInterrupt:
            self._fail(
                ctx, "interrupted; state is saved: run the same command again to resume", code=130
            )
        except Exception as exc:
            self._fail(
                ctx,
                f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            )

    @staticmethod
    def _fail(ctx: click.Context, message: str, code: int = 1) -> None:
        if ctx.obj and ctx.obj.get("debug"):
            raise
        err_console.print(f"[bold red]Error:[/] {message}".replace("\n", " "), soft_wrap=True)
        ctx.exit(code)


def _csv_ints(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return numbers


def _assignments(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    parsed = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}")
        parsed[name] = value
    return parsed


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    from cnnforge.tuning.timebudget import parse_duration

    try:
        return None if value is None else parse_duration(value)
    except CnnforgeError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group(cls=CnnforgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="CNNFORGE_DEBUG", help="Show tracebacks.")
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="PATH",
    help="Load plugins from a .py file or module (repeatable; also CNNFORGE_PLUGINS).",
)
@click.option(
    "--unsafe-deserialization",
    is_flag=True,
    envvar="CNNFORGE_UNSAFE_DESERIALIZATION",
    help="Load .keras files that hold Python code (Lambda layers). Only for files you trust.",
)
@click.version_option(package_name="cnnforge")
@click.pass_context
def cli(
    ctx: click.Context, debug: bool, plugins: tuple[str, ...], unsafe_deserialization: bool
) -> None:
    """cnnforge: a labelled image dataset to a deployable, benchmarked ONNX classifier."""
    ctx.obj = {"debug": debug}
    if debug:
        os.environ["CNNFORGE_DEBUG"] = "1"
    if unsafe_deserialization:
        os.environ["CNNFORGE_UNSAFE_DESERIALIZATION"] = "1"
    registry.load_plugins(plugins)


# --- plugins ---------------------------------------------------------------------------------


@cli.group("plugins")
def plugins_group() -> None:
    """List and inspect architecture, backbone and dataset plugins."""


@plugins_group.command("list")
@click.argument("pattern", default="*")
@click.option("--kind", type=click.Choice(registry.KINDS), help="Only plugins of this kind.")
def plugins_list(pattern: str, kind: str | None) -> None:
    """List plugins whose name matches the glob PATTERN."""
    table = Table("name", "kind", "source", "description", box=None, pad_edge=False)
    for plugin in registry.list_plugins(pattern, kind):
        table.add_row(plugin.name, plugin.kind, plugin.source, plugin.description)
    console.print(table)
    for source, cause in registry.load_errors().items():
        err_console.print(f"[yellow]warning:[/] plugin {source} failed to load: {cause}")


@plugins_group.command("show")
@click.argument("name")
@click.option(
    "--data",
    default="fashion_mnist_small",
    show_default=True,
    help="Dataset whose input shape the space is built for.",
)
def plugins_show(name: str, data: str) -> None:
    """Print a plugin's search space: names, types, ranges or choices, defaults."""
    plugin = registry.find(name)
    console.print(
        f"[bold]{plugin.name}[/] ({plugin.kind}, from {plugin.source}): {plugin.description}"
    )
    if plugin.kind == "dataset":
        return
    if plugin.kind == "backbone":
        sizes = ", ".join(f"{k} {v}" for k, v in plugin.info.items() if k.endswith("size"))
        console.print(f"{sizes}; weights: imagenet (default), none, or a weights file")
    _quiet_tensorflow()
    from cnnforge.data.dataset import load_dataset
    from cnnforge.modeling.hypermodel import default_space

    table = Table("hyperparameter", "type", "range or choices", "default", box=None, pad_edge=False)
    for hp in default_space(plugin, load_dataset(data).spec):
        table.add_row(hp.name, type(hp).__name__, _describe_range(hp), repr(hp.default))
    console.print(table)


def _describe_range(hp: Any) -> str:
    kind = type(hp).__name__
    if kind == "Choice":
        return ", ".join(map(str, hp.values))
    if kind in ("Int", "Float"):
        step = f" step {hp.step:g}" if getattr(hp, "step", None) else ""
        return f"{hp.min_value:g} .. {hp.max_value:g}{step} ({hp.sampling or 'linear'})"
    if kind == "Boolean":
        return "True, False"
    return repr(getattr(hp, "value", ""))


# --- search and run --------------------------------------------------------------------------


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
        type=click.Choice(["cpu", "cuda", "tensorrt"]),
        default="cpu",
        show_default=True,
        help="onnxruntime provider candidates are timed on.",
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
            type=click.Choice(["random", "bayesian", "hyperband", "grid"]),
            default=defaults["tuner"],
            show_default=True,
        ),
        click.option(
            "--max-trials",
            type=click.IntRange(min=1),
            default=defaults["max_trials"],
            show_default=True,
        ),
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            default=defaults["epochs"],
            show_default=True,
            help="Epochs per trial (Hyperband: the most a trial gets).",
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
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
            help="Early-stopping patience in epochs (0: off).",
        ),
        click.option(
            "--fix",
            multiple=True,
            callback=_assignments,
            metavar="NAME=VALUE",
            help="Pin a hyperparameter (repeatable).",
        ),
        click.option(
            "--space",
            multiple=True,
            callback=_assignments,
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
            callback=_duration,
            metavar="DURATION",
            help="Wall time for the whole job, final training included (e.g. 30m, 1h): "
            "trials stop in time for the final training.",
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
            type=click.Choice(["auto", "float32", "mixed"]),
            default="auto",
            show_default=True,
            help="Training precision; auto: mixed float16 on a GPU, float32 on a CPU.",
        ),
        *_budget_options,
    ]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _search_config(options: dict[str, Any]) -> Any:
    from cnnforge.tuning.search import SearchConfig

    space = {
        name: [v.strip() for v in values.split(",") if v.strip()]
        for name, values in options["space"].items()
    }
    if options["arch"] and options["backbone"]:
        raise click.UsageError("--arch and --backbone are mutually exclusive; give one")
    if options["weights"] and not options["backbone"]:
        raise click.UsageError("--weights needs --backbone")
    return SearchConfig(
        data=options["data"],
        arch=options["arch"],
        backbone=options["backbone"],
        weights=options["weights"],
        run_dir=options["run_dir"],
        tuner=options["tuner"],
        max_trials=options["max_trials"],
        epochs=options["epochs"],
        batch_size=options["batch_size"],
        objective=options["objective"],
        seed=options["seed"],
        patience=options["patience"],
        fix=options["fix"],
        space=space,
        strategy=options["strategy"],
        **{name: options[name] for name in BUDGET_FIELDS + TRAINING_FIELDS},
    )


TRAINING_FIELDS = ("time_budget", "retrain", "search_fraction", "deterministic", "precision")
BUDGET_FIELDS = (
    "max_latency_ms",
    "max_params",
    "max_flops",
    "max_size_mb",
    "latency_batch_size",
    "latency_provider",
)


class RichSearchProgress:
    """Prints a line per trial and a live epoch counter."""

    def __init__(self, objective: str) -> None:
        self.objective = objective
        self.status: Any = None

    def trial_started(
        self, number: int, total: int | None, hyperparameters: dict[str, Any]
    ) -> None:
        self.label = f"trial {number}/{total}" if total else f"trial {number}"
        self.status = console.status(f"{self.label}: building")
        self.status.start()

    def epoch_ended(self, epoch: int, epochs: int, logs: dict[str, float]) -> None:
        metric = logs.get(self.objective)
        shown = f", {self.objective} {metric:.4f}" if metric is not None else ""
        if self.status:
            self.status.update(f"{self.label}: epoch {epoch}/{epochs}{shown}")

    def trial_ended(self, record: Any) -> None:
        if self.status:
            self.status.stop()
        if record.score is not None:
            score = f"{self.objective} {record.score:.4f}"
        else:
            score = (
                record.message if record.status == "OVER_BUDGET" else "failed: " + record.message
            )
        seconds = f", {record.duration_s:.0f}s" if record.duration_s else ""
        latency = f", {record.latency_ms:.3g} ms" if record.latency_ms is not None else ""
        console.print(
            f"{self.label} (#{record.trial_id}): {score}, {record.params or '?'} params"
            f"{latency}{seconds}"
        )

    def final_training_started(self, epochs: int, epochs_found: int, examples: int) -> None:
        cut = (
            f" of the {epochs_found} the search found, as the time budget holds them now "
            "(planned again after each epoch)"
            if epochs < epochs_found
            else ""
        )
        console.print(
            f"final training: the best trial again on train+validation ({examples} images), {epochs} epochs{cut}"
        )
        self.label = "final training"
        self.status = console.status(f"{self.label}: building")
        self.status.start()

    def final_training_ended(self, epochs: int, seconds: float) -> None:
        if self.status:
            self.status.stop()
        console.print(f"final training: {epochs} epochs in {seconds:.0f}s")


def _print_trials(result: Any) -> None:
    table = Table(
        "trial",
        "status",
        result.objective,
        "params",
        "ms",
        "epochs",
        "seconds",
        "hyperparameters",
        title="Trials, best first",
        box=None,
        pad_edge=False,
    )
    reverse = higher_is_better(result.objective)
    ranked = sorted(
        result.trials,
        key=lambda r: (
            r.score if r.score is not None else float("-inf") if reverse else float("inf")
        ),
        reverse=reverse,
    )
    for r in ranked[:15]:
        hps = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in r.hyperparameters.items()
        )
        table.add_row(
            r.trial_id,
            r.status,
            "" if r.score is None else f"{r.score:.4f}",
            str(r.params or ""),
            "" if r.latency_ms is None else f"{r.latency_ms:.3g}",
            str(r.epochs or ""),
            f"{r.duration_s:.1f}" if r.duration_s else "",
            hps,
        )
    console.print(table)


@cli.command()
@search_options(
    {
        "data": "fashion_mnist_small",
        "arch": "simple_cnn",
        "run_dir": Path("runs/search"),
        "tuner": "random",
        "max_trials": 10,
        "epochs": 10,
        "patience": 3,
    }
)
@click.option(
    "--distributed",
    type=click.Choice(["chief", "worker"]),
    help="Distributed search on KerasTuner's chief/worker engine.",
)
@click.option("--listen", metavar="HOST:PORT", help="Chief: where to serve the oracle.")
@click.option(
    "--chief", "chief_address", metavar="HOST:PORT", help="Worker: the chief to work for."
)
@click.option("--worker-id", help="Worker: a name unique among the workers.")
@click.option(
    "--worker-timeout",
    type=click.FloatRange(min=1),
    default=300,
    show_default=True,
    help="Chief: seconds of silence after which a worker's trial goes to another.",
)
def search(distributed, listen, chief_address, worker_id, worker_timeout, **options: Any) -> None:
    """Search an architecture's or a backbone's hyperparameters with KerasTuner; keep the best."""
    _quiet_tensorflow()
    from cnnforge.tuning.search import search as run_search
    from cnnforge.tuning.search import work

    config = _search_config(options)
    config.distributed, config.worker_id, config.worker_timeout = (
        distributed,
        worker_id,
        worker_timeout,
    )
    config.address = listen if distributed == "chief" else chief_address
    progress = RichSearchProgress(config.objective)
    if distributed == "chief":
        console.print(f"chief: serving the oracle on {listen}; start workers with --chief {listen}")
    if distributed == "worker":
        ran = work(config, progress=progress)
        console.print(f"worker {worker_id}: ran {len(ran)} trial(s); the chief has no more")
        return
    result = run_search(config, progress=progress)
    _print_trials(result)
    console.print(f"best model: {result.best_model}\ntrials:     {result.run_dir / 'trials.csv'}")


@cli.command()
@search_options(
    {
        "data": "fashion_mnist_small",
        "arch": "simple_cnn",
        "run_dir": Path("runs/latest"),
        "tuner": "random",
        "max_trials": 6,
        "epochs": 12,
        "patience": 3,
    }
)
def run(**options: Any) -> None:
    """Search, export to ONNX, check parity, benchmark and evaluate: the whole job."""
    _quiet_tensorflow()
    import time

    from cnnforge.pipeline import run as run_pipeline

    config = _search_config(options)
    start = time.perf_counter()
    result = run_pipeline(
        config,
        progress=RichSearchProgress(config.objective),
        stage=lambda name: console.rule(f"[bold]{name}"),
    )
    _print_trials(result.search)
    _print_bench(result.bench)
    console.print(f"parity: {result.export.parity.summary()}")
    console.print(
        f"[bold]test accuracy (onnxruntime): {result.evaluation.accuracy:.2%}[/] on "
        f"{result.evaluation.images} images; total {time.perf_counter() - start:.0f}s"
    )
    for name, path in result.artifacts().items():
        console.print(f"  {name:<16} {path}", soft_wrap=True)  # long paths stay whole


# --- export, bench, evaluate, report ----------------------------------------------------------


@cli.command()
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
    type=click.Choice(["fp32", "fp16", "int8"]),
    default="fp32",
    show_default=True,
    help="fp16: half-precision weights and compute; int8: static "
    "QDQ quantization calibrated on training images.",
)
@click.option(
    "--layout",
    type=click.Choice(["nhwc", "nchw"], case_sensitive=False),
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
    help="Least top-1 agreement with Keras  [default: 0.95 for int8]",
)
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda", "tensorrt"]),
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
) -> None:
    """Export a run directory or .keras file to ONNX; check parity and test accuracy."""
    _quiet_tensorflow()
    from cnnforge.conversion.export import export as run_export

    if trial_id is not None:
        from cnnforge.tuning.search import trial_model

        source = trial_model(source, trial_id)
        output = output or source.with_name(f"model-trial-{trial_id}.onnx")

    result = run_export(
        source,
        output,
        opset=opset,
        data=data,
        precision=precision,
        layout=layout,
        atol=atol,
        min_top1_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
        force=force,
        calibration_images=calibration_images,
        provider=provider,
    )
    console.print(
        f"wrote {result.onnx_path} ({result.size_bytes / 1e6:.2f} MB, {result.precision}, "
        f"{result.layout}, opset {result.opset}, converted in {result.seconds:.2f}s)",
        soft_wrap=True,
    )
    console.print(f"parity: {result.parity.summary()} → {result.parity_path}", soft_wrap=True)
    if result.accuracy is not None:
        console.print(f"accuracy: {result.accuracy.summary()}", soft_wrap=True)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--sort",
    "column",
    metavar="COLUMN",
    help="A trials.csv column (latency_ms, size_mb, params...)  [default: the objective, best first]",
)
@click.option("--front", is_flag=True, help="Only the Pareto front of (objective, latency, size).")
def trials(run_dir: Path, column: str | None, front: bool) -> None:
    """List a run's trials with their measured cost; * marks the Pareto front."""
    from cnnforge.core.objectives import sorted_trials
    from cnnforge.report.markdown import read_run

    run = read_run(run_dir)
    objective = run["config"]["search"]["objective"]
    rows = sorted_trials(run["trials"], objective, column)
    if front:
        rows = [r for r in rows if r.get("pareto") == "1"]
    headers = [
        "trial",
        "status",
        objective,
        "ms",
        "MB",
        "params",
        "FLOPs",
        "epochs",
        "s",
        "front",
        "message",
    ]
    cells = [
        "trial_id",
        "status",
        "score",
        "latency_ms",
        "size_mb",
        "params",
        "flops",
        "epochs",
        "duration_s",
    ]
    table = [
        [_short(r.get(c)) for c in cells] + ["*" if r.get("pareto") == "1" else "", r["message"]]
        for r in rows
    ]
    _print_table(headers, table, title=f"{len(rows)} trial(s) of {run_dir}")


def _short(text: str | None) -> str:
    """A trials.csv cell for a table: whole numbers in full, others to 4 significant digits."""
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return text or ""
    if value is None:
        return ""
    return str(int(value)) if value.is_integer() else f"{value:.4g}"


def _print_bench(report: Any) -> None:
    from cnnforge.bench.output import (
        BEST_HEADERS,
        best_thread_rows,
        compact_tables,
        describe_setup,
    )
    from cnnforge.bench.results import results_as_json

    rows = results_as_json(report)
    for line in describe_setup(rows):
        console.print(line, soft_wrap=True)
    for title, headers, cells in compact_tables(rows):
        _print_table(headers, cells, title=title)
    best = best_thread_rows(rows)
    if best:
        _print_table(BEST_HEADERS, best, title="Best thread count per batch size")


def _print_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    table = Table(
        *headers,
        box=None,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        title=title,
        title_justify="left",
        title_style="bold",
    )
    for row in rows:
        table.add_row(*row)
    console.print(table)


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


@cli.group("bench", cls=DefaultCommandGroup)
def bench_group() -> None:
    """Time ONNX models with onnxruntime (bench MODEL...), or gate on a regression (bench compare)."""


@bench_group.command("run")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--batch-sizes",
    callback=_csv_ints,
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
    from cnnforge.bench import output as bench_output
    from cnnforge.bench.results import results_as_json
    from cnnforge.bench.sweep import benchmark
    from cnnforge.core.atomic import atomic_write_text

    if settings["keras_model"]:
        _quiet_tensorflow()
    names = tuple(p.strip() for p in providers.split(",") if p.strip())
    with console.status("measuring") as status:
        report = benchmark(
            list(models),
            providers=names,
            peak=not no_peak,
            progress=lambda message: status.update(message),
            **settings,
        )
    _print_bench(report)
    rows = results_as_json(report)
    if json_out:
        _write_json(json_out, rows)
    for path, render in (
        (csv_out, bench_output.render_csv),
        (markdown_out, bench_output.render_markdown),
    ):
        if path:
            atomic_write_text(path, render(rows))
            console.print(f"wrote {path}", soft_wrap=True)
    if out_dir:
        for path in bench_output.write_outputs(report, out_dir).values():
            console.print(f"wrote {path}", soft_wrap=True)


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
    _print_table(COMPARE_HEADERS, comparison_rows(result), title="Medians (ms), new / base")
    if result.passed:
        console.print(f"[green]passed[/]: no cell slower than {threshold:.0%} beyond its interval")
        return
    err_console.print(
        f"[bold red]FAILED[/]: {len(result.slower)} cell(s) slower than "
        f"{threshold:.0%} beyond their intervals"
    )
    ctx.exit(1)


def _write_json(path: Path, data: Any) -> None:
    from cnnforge.core.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2))
    console.print(f"wrote {path}", soft_wrap=True)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Dataset whose test split to score on.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the scores here.")
def evaluate(model: Path, data: str, json_out: Path | None) -> None:
    """Accuracy and per-class precision/recall of an ONNX model, with onnxruntime."""
    from cnnforge.evaluation.evaluate import evaluate as run_evaluate

    result = run_evaluate(model, data)
    table = Table("class", "precision", "recall", "images", box=None, pad_edge=False)
    for c in result.per_class:
        table.add_row(c.name, f"{c.precision:.3f}", f"{c.recall:.3f}", str(c.support))
    console.print(table)
    console.print(
        f"[bold]accuracy {result.accuracy:.2%}[/] on {result.images} test images of {data}"
    )
    if json_out:
        _write_json(json_out, asdict(result))


@cli.command("inspect")
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
        _write_json(json_out, asdict(info))


def _print_metadata(ours: dict[str, Any], others: dict[str, str]) -> None:
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


@cli.command("predict")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the labels here.")
def predict_command(
    model: Path, images: tuple[Path, ...], top_k: int, provider: str, json_out: Path | None
) -> None:
    """Top-k labels of IMAGE files with onnxruntime alone (no TensorFlow)."""
    from cnnforge.deploy.predict import Classifier

    predictions = Classifier(model, provider=provider).predict(list(images), top_k)
    table = Table("image", "label", "probability", box=None, pad_edge=False)
    for prediction in predictions:
        for rank, (label, probability) in enumerate(prediction.top):
            image = escape(prediction.image) if rank == 0 else ""
            table.add_row(image, escape(label), f"{probability:.4f}")
    console.print(table)
    if json_out:
        _write_json(json_out, [p.as_dict() for p in predictions])


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Rebuild report.md and report.html (figures, sortable trials) of a run directory."""
    from cnnforge.report.markdown import write_report

    console.print(f"wrote {write_report(run_dir)}")
    _quiet_tensorflow()
    from cnnforge.report.figures import missing_artifacts
    from cnnforge.report.html import write_html_report
    from cnnforge.report.markdown import read_run

    console.print(f"wrote {write_html_report(run_dir)}")
    for missing in missing_artifacts(run_dir, read_run(run_dir)):
        err_console.print(
            f"[yellow]missing {missing.file}:[/] {missing.consequence}; {missing.remedy}",
            soft_wrap=True,
        )


@cli.command()
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
    _quiet_tensorflow()
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


def main() -> None:
    cli(prog_name="cnnforge")


if __name__ == "__main__":
    sys.exit(main())
