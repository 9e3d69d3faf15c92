"""The ``cnnforge`` command: parse, call the Python API, print. TensorFlow is imported lazily,
inside the commands that need it, so ``--help`` and ``plugins list`` stay instant."""

from __future__ import annotations

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
from rich.table import Table

from cnnforge import registry
from cnnforge.errors import CnnforgeError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", module=r"(keras|tensorflow|tf2onnx|google)(\..*)?")


class CnnforgeGroup(click.Group):
    """Turns user errors into one line and a non-zero exit; tracebacks only under --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except CnnforgeError as exc:
            self._fail(ctx, str(exc))
        except KeyboardInterrupt:
            self._fail(ctx, "interrupted", code=130)
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


@click.group(cls=CnnforgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="CNNFORGE_DEBUG", help="Show tracebacks.")
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="PATH",
    help="Load plugins from a .py file or module (repeatable; also CNNFORGE_PLUGINS).",
)
@click.version_option(package_name="cnnforge")
@click.pass_context
def cli(ctx: click.Context, debug: bool, plugins: tuple[str, ...]) -> None:
    """cnnforge: a labelled image dataset to a deployable, benchmarked ONNX classifier."""
    ctx.obj = {"debug": debug}
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
@click.option("--data", default="fashion_mnist_small", show_default=True,
              help="Dataset whose input shape the space is built for.")  # fmt: skip
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
    from cnnforge.data import load_dataset
    from cnnforge.hypermodel import default_space

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


def search_options(defaults: dict[str, Any]) -> Callable[[Callable], Callable]:
    """The options that define a search, shared by ``search`` and ``run`` with their defaults."""
    options = [
        click.option("--data", default=defaults["data"], show_default=True,
                     help="NAME, NAME:PATH, dir:FOLDER or FILE.npz."),
        click.option("--arch", help=f"Architecture plugin [default: {defaults['arch']}]."),
        click.option("--backbone", metavar="NAME|run:PATH",
                     help="Transfer learning from a backbone plugin, or from a run directory or "
                          ".keras model (instead of --arch)."),
        click.option("--weights", metavar="imagenet|none|PATH",
                     help="Backbone weights: imagenet (the default; keras downloads them once), "
                          "none, or a local weights file."),
        click.option("--run-dir", type=click.Path(path_type=Path), default=defaults["run_dir"],
                     show_default=True, help="Where the run's artifacts go; rerun to resume."),
        click.option("--tuner", type=click.Choice(["random", "bayesian", "hyperband", "grid"]),
                     default=defaults["tuner"], show_default=True),
        click.option("--max-trials", type=click.IntRange(min=1), default=defaults["max_trials"],
                     show_default=True),
        click.option("--epochs", type=click.IntRange(min=1), default=defaults["epochs"],
                     show_default=True, help="Epochs per trial (Hyperband: the most a trial gets)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
        click.option("--objective", default="val_accuracy", show_default=True,
                     help="Metric to optimise; names with 'loss' are minimised."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--patience", type=click.IntRange(min=0), default=defaults["patience"],
                     show_default=True, help="Early-stopping patience in epochs (0: off)."),
        click.option("--fix", multiple=True, callback=_assignments, metavar="NAME=VALUE",
                     help="Pin a hyperparameter (repeatable)."),
        click.option("--space", multiple=True, callback=_assignments, metavar="NAME=V1,V2",
                     help="Narrow a hyperparameter to these values (repeatable)."),
    ]  # fmt: skip

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _search_config(options: dict[str, Any]) -> Any:
    from cnnforge.search import SearchConfig

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
        score = (
            "failed: " + record.message
            if record.score is None
            else f"{self.objective} {record.score:.4f}"
        )
        seconds = f", {record.duration_s:.0f}s" if record.duration_s else ""
        console.print(
            f"{self.label} (#{record.trial_id}): {score}, {record.params or '?'} params{seconds}"
        )


def _print_trials(result: Any) -> None:
    table = Table("trial", "status", result.objective, "params", "epochs", "seconds", "hyperparameters",
                  title="Trials, best first", box=None, pad_edge=False)  # fmt: skip
    reverse = "loss" not in result.objective
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
        table.add_row(r.trial_id, r.status, "" if r.score is None else f"{r.score:.4f}", str(r.params or ""),
                      str(r.epochs or ""), f"{r.duration_s:.1f}" if r.duration_s else "", hps)  # fmt: skip
    console.print(table)


@cli.command()
@search_options({"data": "fashion_mnist_small", "arch": "simple_cnn", "run_dir": Path("runs/search"),
                 "tuner": "random", "max_trials": 10, "epochs": 10, "patience": 3})  # fmt: skip
def search(**options: Any) -> None:
    """Search an architecture's or a backbone's hyperparameters with KerasTuner; keep the best."""
    _quiet_tensorflow()
    from cnnforge.search import search as run_search

    config = _search_config(options)
    result = run_search(config, progress=RichSearchProgress(config.objective))
    _print_trials(result)
    console.print(f"best model: {result.best_model}\ntrials:     {result.run_dir / 'trials.csv'}")


@cli.command()
@search_options({"data": "fashion_mnist_small", "arch": "simple_cnn", "run_dir": Path("runs/latest"),
                 "tuner": "random", "max_trials": 5, "epochs": 8, "patience": 2})  # fmt: skip
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
        console.print(f"  {name:<16} {path}")


# --- export, bench, evaluate, report ----------------------------------------------------------


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Default: model.onnx beside the source."
)
@click.option("--opset", type=click.IntRange(min=9), default=17, show_default=True)
@click.option("--data", help="Dataset for parity images (default: the run's own data).")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest allowed |Keras - ONNX| probability difference.")  # fmt: skip
def export(source: Path, output: Path | None, opset: int, data: str | None, atol: float) -> None:
    """Export a run directory or .keras file to ONNX and check parity."""
    _quiet_tensorflow()
    from cnnforge.export import export as run_export

    result = run_export(source, output, opset=opset, data=data, atol=atol)
    console.print(f"wrote {result.onnx_path} ({result.size_bytes / 1e6:.2f} MB, opset {result.opset}, "
                  f"converted in {result.seconds:.2f}s)")  # fmt: skip
    console.print(f"parity: {result.parity.summary()} → {result.parity_path}")


def _print_bench(report: Any) -> None:
    from cnnforge.bench import results_as_json
    from cnnforge.report import BENCH_HEADERS, bench_rows

    table = Table(*BENCH_HEADERS, box=None, pad_edge=False)
    for row in bench_rows(results_as_json(report)):
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v or "") for v in row))
    env = report.environment
    console.print(f"{env['cpu']}, {env['cores']} cores, onnxruntime {env['onnxruntime']}")
    console.print(table)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=_csv_ints)
@click.option(
    "--threads", type=click.IntRange(min=1), help="intra-op threads (default: onnxruntime's)."
)
@click.option(
    "--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True
)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--iterations", type=click.IntRange(min=2), default=100, show_default=True)
@click.option("--keras", "keras_model", type=click.Path(path_type=Path),
              help="Also time this .keras model (tf.function) in the same run.")  # fmt: skip
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results here.")
def bench(model: Path, batch_sizes: tuple[int, ...], threads: int | None, provider: str, warmup: int,
          iterations: int, keras_model: Path | None, json_out: Path | None) -> None:  # fmt: skip
    """Time an ONNX model with onnxruntime: latency percentiles and throughput per batch size."""
    from cnnforge.bench import benchmark, results_as_json

    if keras_model:
        _quiet_tensorflow()
    report = benchmark(model, batch_sizes=batch_sizes, threads=threads, provider=provider,
                       warmup=warmup, iterations=iterations, keras_model=keras_model)  # fmt: skip
    _print_bench(report)
    if json_out:
        _write_json(json_out, results_as_json(report))


def _write_json(path: Path, data: Any) -> None:
    from cnnforge.artifacts import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2))
    console.print(f"wrote {path}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Dataset whose test split to score on.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the scores here.")
def evaluate(model: Path, data: str, json_out: Path | None) -> None:
    """Accuracy and per-class precision/recall of an ONNX model, with onnxruntime."""
    from cnnforge.evaluate import evaluate as run_evaluate

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


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Rebuild report.md of a run directory from its files."""
    from cnnforge.report import write_report

    console.print(f"wrote {write_report(run_dir)}")


def main() -> None:
    cli(prog_name="cnnforge")


if __name__ == "__main__":
    sys.exit(main())
