"""The one place that wires the stages: data → search → export → parity → bench → evaluate →
report. The dataset is loaded once here and handed to every stage."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cnnforge.bench.output import write_bench_files
from cnnforge.bench.results import BenchReport
from cnnforge.bench.sweep import benchmark
from cnnforge.conversion.export import ExportResult, export
from cnnforge.core.rundir import RunDir
from cnnforge.data.dataset import Dataset
from cnnforge.evaluation.evaluate import Evaluation, evaluate
from cnnforge.report.reports import write_reports
from cnnforge.tracking import open_tracking
from cnnforge.tuning.search import SearchConfig, SearchProgress, SearchResult, search, trial_model

RUN_BATCH_SIZES = (1, 32)
# Of a time budget, what is kept for export, parity, benchmark, evaluation and the reports.
AFTER_SEARCH_SHARE, AFTER_SEARCH_MIN_S = 0.03, 30.0


@dataclass
class RunResult:
    search: SearchResult
    export: ExportResult
    bench: BenchReport
    evaluation: Evaluation
    report: Path

    @property
    def run_dir(self) -> Path:
        return self.search.run_dir

    def artifacts(self) -> dict[str, Path]:
        return RunDir(self.run_dir).artifacts()


def export_trial(
    run_dir: Path | str, trial_id: str, output: Path | str | None = None, **options: Any
) -> ExportResult:
    """Export any trial of a run, not only the winner: its model as ``trial-ID.keras`` (its
    checkpoint, or trained again where it has none), then ``export`` with ``options``, to
    ``model-trial-ID.onnx`` in the run directory unless ``output`` says otherwise."""
    source = trial_model(run_dir, trial_id)
    return export(
        source, output or RunDir(run_dir).model_file(f"model-trial-{trial_id}.onnx"), **options
    )


def _track_winner(run_dir: RunDir, tracked: Sequence[str], model_name: str) -> None:
    """The winner's files to the trackers that logged the search to its end (``tracked``: one
    that failed during the search is not opened again), its ONNX model registered (MLflow)."""
    tracking = open_tracking(run_dir.path, tracked, model_name=model_name)
    files = [run_dir.onnx, RunDir.parity_for(run_dir.onnx), run_dir.bench, run_dir.report_html]
    tracking.winner(files, run_dir.onnx)
    tracking.close()


def run(
    config: SearchConfig,
    *,
    dataset: Dataset | None = None,
    progress: SearchProgress | None = None,
    stage: Callable[[str], None] = lambda name: None,
    bench_iterations: int = 200,
    bench_min_duration_s: float = 1.0,
) -> RunResult:
    """Search, export the best model, check parity, benchmark it, evaluate it, and report.

    A time budget counts from here, the loading of the data included."""
    started = time.time()
    stage("search")
    if dataset is None:
        dataset = config.load_data()
    budget = config.effective_time_budget()
    keep_after = max(AFTER_SEARCH_MIN_S, AFTER_SEARCH_SHARE * budget) if budget else 0
    found = search(
        config, dataset=dataset, progress=progress, keep_after=keep_after, started=started
    )
    run_dir = RunDir(found.run_dir)
    stage("export")
    exported = export(run_dir.path, data=dataset, calibrate=True)
    stage("bench")
    timing = benchmark(
        exported.onnx_path,
        batch_sizes=RUN_BATCH_SIZES,
        min_iterations=bench_iterations,
        min_duration_s=bench_min_duration_s,
        warmup=20,
        keras_model=found.best_model,
    )
    write_bench_files(timing, json_path=run_dir.bench)
    stage("evaluate")
    scored = evaluate(exported.onnx_path, dataset)
    run_dir.write_json(run_dir.evaluation, asdict(scored))
    stage("report")
    reports = write_reports(run_dir.path, dataset)
    _track_winner(run_dir, found.tracked, config.model_name)
    return RunResult(found, exported, timing, scored, reports.markdown)
