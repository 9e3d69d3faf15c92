"""What the commands print: the consoles, tables, the search's live progress, and the trials and
bench tables that ``run`` shares with ``search`` and ``bench``."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cnnforge.core.errors import CnnforgeWarning
from cnnforge.core.objectives import best_first

if TYPE_CHECKING:
    from cnnforge.bench.results import BenchReport
    from cnnforge.tuning.records import TrialRecord
    from cnnforge.tuning.search import SearchResult

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)


def quiet_tensorflow() -> None:
    """Keep TensorFlow's and keras' log lines and warnings off the terminal; call before
    importing them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", module=r"(keras|tensorflow|tf2onnx|google)(\..*)?")


def show_warning(fallback: Callable, message: Any, category: type, *args: Any) -> None:
    """cnnforge's warnings as one yellow line on stderr; other warnings as Python shows them."""
    if issubclass(category, CnnforgeWarning):
        # escaped: a message's own brackets (cnnforge[mlflow], a path) are not markup
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True)
    else:
        fallback(message, category, *args)


def print_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
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


def print_written(paths: list[Path]) -> None:
    for path in paths:
        console.print(f"wrote {path}", soft_wrap=True)


def write_json(path: Path, data: Any) -> None:
    """A command's ``--json`` file, written atomically."""
    from cnnforge.core.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2))
    print_written([path])


class RichSearchProgress:
    """Prints a line per trial and a live epoch counter."""

    def __init__(self, objective: str) -> None:
        self.objective = objective
        self.status: Any = None
        self.label = "trial"  # a distributed chief hears of trials only when they end

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

    def trial_ended(self, record: TrialRecord) -> None:
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
            f"final training: the best trial again on train+validation ({examples} images), "
            f"{epochs} epochs{cut}"
        )
        self.label = "final training"
        self.status = console.status(f"{self.label}: building")
        self.status.start()

    def final_training_ended(self, epochs: int, seconds: float) -> None:
        if self.status:
            self.status.stop()
        console.print(f"final training: {epochs} epochs in {seconds:.0f}s")


def print_trials(result: SearchResult) -> None:
    """The 15 best trials of a search, failed and unscored ones last."""
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
    for r in best_first(result.trials, result.objective)[:15]:
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


def print_bench(report: BenchReport) -> None:
    """The machine and method, a table per model and runtime, and the best thread counts."""
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
        print_table(headers, cells, title=title)
    best = best_thread_rows(rows)
    if best:
        print_table(BEST_HEADERS, best, title="Best thread count per batch size")


def print_tracking(result: SearchResult) -> None:
    """How to look at the search's trials in the trackers that logged it to its end (one that
    failed to start or stopped was a warning already, and has nothing to look at)."""
    from cnnforge.core.rundir import RunDir
    from cnnforge.tracking.mlflow import tracking_uri

    run = RunDir(result.run_dir)
    if "tensorboard" in result.tracked:
        console.print(f"tensorboard: tensorboard --logdir {run.tensorboard}", soft_wrap=True)
    if "mlflow" in result.tracked:
        uri = tracking_uri(run.path)
        line = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri
        console.print(f"mlflow:      {line}", soft_wrap=True)
