"""``cnnforge search`` (alone, or as a distributed chief or worker), ``cnnforge run`` (the whole
job) and ``cnnforge trials`` (a run's trials, ranked)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from cnnforge.cli.options import search_config, search_options
from cnnforge.cli.output import (
    RichSearchProgress,
    console,
    print_bench,
    print_table,
    print_tracking,
    print_trials,
    quiet_tensorflow,
)


@click.command()
@search_options(
    {
        "data": "fashion_mnist_small",
        "arch": "simple_cnn",
        "run_dir": Path("runs/search"),
        "tuner": "auto",
        "patience": 3,
    }
)
@click.option(
    "--distributed",
    type=click.Choice(["chief", "worker"]),
    help="Distributed search on KerasTuner's chief/worker engine.",
)
@click.option("--listen", metavar="HOST:PORT", help="Chief: where to serve the oracle.")
@click.option("--chief", metavar="HOST:PORT", help="Worker: the chief to work for.")
@click.option("--worker-id", help="Worker: a name unique among the workers.")
@click.option(
    "--worker-timeout",
    type=click.FloatRange(min=1),
    default=300,
    show_default=True,
    help="Chief: seconds of silence after which a worker's trial goes to another. Worker: "
    "seconds to wait for the chief's plan (auto search).",
)
def search(**options: Any) -> None:
    """Search an architecture's or a backbone's hyperparameters with KerasTuner; keep the best."""
    quiet_tensorflow()
    from cnnforge.core.rundir import RunDir
    from cnnforge.tuning.search import search as run_search
    from cnnforge.tuning.search import work

    config = search_config(options)
    progress = RichSearchProgress(config.objective)
    if config.distributed == "worker":
        ran = work(config, progress=progress)
        console.print(f"worker {config.worker_id}: ran {len(ran)} trial(s); the chief has no more")
        return
    if config.distributed == "chief":
        console.print(
            f"chief: serving the oracle on {config.address}; "
            f"start workers with --chief {config.address}"
        )
    result = run_search(config, progress=progress)
    print_trials(result)
    trials_csv = RunDir(result.run_dir).trials
    console.print(f"best model: {result.best_model}\ntrials:     {trials_csv}")
    print_tracking(result)


@click.command()
@search_options(
    {
        "data": "fashion_mnist_small",
        "arch": "simple_cnn",
        "run_dir": Path("runs/latest"),
        "tuner": "auto",
        "patience": 3,
    }
)
def run(**options: Any) -> None:
    """Search, export to ONNX, check parity, benchmark and evaluate: the whole job."""
    quiet_tensorflow()
    from cnnforge.pipeline import run as run_pipeline

    config = search_config(options)
    start = time.perf_counter()
    result = run_pipeline(
        config,
        progress=RichSearchProgress(config.objective),
        stage=lambda name: console.rule(f"[bold]{name}"),
    )
    print_trials(result.search)
    print_bench(result.bench)
    console.print(f"parity: {result.export.parity.summary()}")
    console.print(
        f"[bold]test accuracy (onnxruntime): {result.evaluation.accuracy:.2%}[/] on "
        f"{result.evaluation.images} images; total {time.perf_counter() - start:.0f}s"
    )
    for name, path in result.artifacts().items():
        console.print(f"  {name:<16} {path}", soft_wrap=True)  # long paths stay whole
    print_tracking(result.search)


# trials.csv columns shown by ``trials``, under these headers (the score under the objective's
# name), then whether the trial is on the Pareto front, and its message.
_TRIAL_COLUMNS = {
    "trial_id": "trial",
    "status": "status",
    "score": "",
    "latency_ms": "ms",
    "size_mb": "MB",
    "params": "params",
    "flops": "FLOPs",
    "epochs": "epochs",
    "duration_s": "s",
}


@click.command()
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
    from cnnforge.core.rundir import RunDir

    run = RunDir(run_dir).read()
    objective = run["config"]["search"]["objective"]
    rows = sorted_trials(run["trials"], objective, column)
    if front:
        rows = [r for r in rows if r.get("pareto") == "1"]
    headers = [header or objective for header in _TRIAL_COLUMNS.values()] + ["front", "message"]
    table = [
        [_short(r.get(c)) for c in _TRIAL_COLUMNS]
        + ["*" if r.get("pareto") == "1" else "", r["message"]]
        for r in rows
    ]
    print_table(headers, table, title=f"{len(rows)} trial(s) of {run_dir}")


def _short(text: str | None) -> str:
    """A trials.csv cell for a table: whole numbers in full, others to 4 significant digits."""
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return text or ""
    if value is None:
        return ""
    return str(int(value)) if value.is_integer() else f"{value:.4g}"
