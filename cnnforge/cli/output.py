"""What the commands print: the consoles, tables, the search's live progress, and the trials and
bench tables that ``run`` shares with ``search`` and ``bench``."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cnnforge.core.errors import CnnforgeWarning
from cnnforge.core.objectives import best_first, higher_is_better

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


def silence_tensorflow_logs() -> None:
    """Keep TensorFlow's C++ log lines off the terminal; call before importing it (the CLI does,
    unless --debug). Level 3 drops what it logs once running (tf2onnx's grappler pass logs
    "Starting new session" per converted model; on TensorFlow 2.21 level 2 lets those through);
    the notices it writes while its libraries load, before absl's logging is set up, pass any
    level ("oneDNN custom operations are on"), so its import runs with stderr on /dev/null. A
    variable the user set is kept."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules and not any(
        isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` (once) as the other finders do, its loader's ``exec_module``
    wrapped to run with stderr on /dev/null. An import that fails still raises its error."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                with _stderr_to_devnull():
                    run(module)

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


@contextlib.contextmanager
def _stderr_to_devnull() -> Any:
    """File descriptor 2 (C++ writes there, not to ``sys.stderr``) on /dev/null, then back."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


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
    if console.is_terminal:
        console.print(table)
        return
    # into a pipe or a file a table keeps its natural width: no cell cut to fit 80 columns
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    Console(file=console.file, width=natural, highlight=False).print(table)


def print_written(paths: list[Path]) -> None:
    for path in paths:
        console.print(f"wrote {path}", soft_wrap=True)


def write_json(path: Path, data: Any) -> None:
    """A command's ``--json`` file, written atomically."""
    from cnnforge.core.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2))
    print_written([path])


class RichSearchProgress:
    """Prints one line per trial (its score, the best so far, time spent and left) and a live
    epoch counter where the output is a terminal."""

    def __init__(self, objective: str) -> None:
        self.objective = objective
        self.status: Any = None
        self.label = "trial"  # a distributed chief hears of trials only when they end
        self.started = time.time()
        self.ends_at: float | None = None
        self.best: float | None = None

    def search_planned(self, summary: str, ends_at: float | None) -> None:
        self.ends_at = ends_at
        left = f", {_clock(ends_at - time.time())} budget left" if ends_at else ""
        console.print(f"plan: {summary}{left}")

    def note(self, text: str) -> None:
        console.print(text)

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
            higher = higher_is_better(self.objective)
            if self.best is None or (record.score > self.best) == higher:
                self.best = record.score
            score = f"{self.objective} {record.score:.4f} (best {self.best:.4f})"
        else:
            score = (
                record.message if record.status == "OVER_BUDGET" else "failed: " + record.message
            )
        epochs = f", {record.epochs} ep" if record.epochs else ""
        seconds = f" in {record.duration_s:.0f}s" if record.duration_s else ""
        console.print(f"{self.label} #{record.trial_id}{epochs}: {score}{seconds}; {self._clock()}")

    def _clock(self) -> str:
        elapsed = f"{_clock(time.time() - self.started)} elapsed"
        return f"{elapsed}, {_clock(self.ends_at - time.time())} left" if self.ends_at else elapsed

    def final_training_started(self, epochs: int, epochs_found: int, examples: int) -> None:
        cut = (
            f" of the {epochs_found} planned, as the time budget holds them now "
            "(planned again after each epoch)"
            if epochs < epochs_found
            else ""
        )
        console.print(
            f"final training: the best trial again on train+validation ({examples} images), "
            f"{epochs} epochs{cut}; {self._clock()}"
        )
        self.label = "final training"
        self.status = console.status(f"{self.label}: building")
        self.status.start()

    def final_training_ended(self, epochs: int, seconds: float) -> None:
        if self.status:
            self.status.stop()
        console.print(f"final training: {epochs} epochs in {seconds:.0f}s; {self._clock()}")


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


TRIAL_LINE_HYPERPARAMETERS = 3  # shown per trial: those that differ from the winner's, first


def print_trials(result: SearchResult) -> None:
    """The winner, then the 14 best other trials, one plain line each (readable in a log as in
    a terminal): score, size, time, and up to three hyperparameters where the trial differs
    from the winner (all of them: trials.csv). The winner is the search's (the auto search's
    is the best at the longest length run, not always the highest score)."""
    best = result.best_trial
    others = [r for r in best_first(result.trials, result.objective) if r.trial_id != best.trial_id]
    ranked = [best, *others][:15]
    winner = best.hyperparameters
    rows = []
    for r in ranked:
        differs = [
            _setting(k, v)
            for k, v in r.hyperparameters.items()
            if not k.startswith("tuner/") and winner.get(k) != v
        ]
        more = len(differs) - TRIAL_LINE_HYPERPARAMETERS
        shown = ", ".join(differs[:TRIAL_LINE_HYPERPARAMETERS]) + (f", +{more}" if more > 0 else "")
        rows.append(
            [
                f"#{r.trial_id}",
                r.status if r.status != "COMPLETED" else "ok",
                "" if r.score is None else f"{r.score:.4f}",
                str(r.params or ""),
                "" if r.latency_ms is None else f"{r.latency_ms:.3g}",
                str(r.epochs or ""),
                f"{r.duration_s:.0f}" if r.duration_s else "",
                "(winner)" if r is best else shown or "(same)",
            ]
        )
    headers = ["trial", "status", result.objective, "params", "ms", "ep", "s", "vs winner"]
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    console.print("[bold]Trials, best first[/] (all hyperparameters: trials.csv)")
    recipes = sorted({r.training for r in ranked if r.training})
    if recipes:  # cnnforge's, or the model's own (its compile, at its own batch size)
        console.print(escape(f"training recipe: {'; '.join(recipes)}"))
    for line in [headers, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(line[:-1], widths, strict=False)]
        console.print(escape(" ".join([*cells, line[-1]])), soft_wrap=True)


def _setting(name: str, value: Any) -> str:
    return f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"


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
