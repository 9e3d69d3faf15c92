"""The one place that wires the stages: data → search → export → parity → bench → evaluate →
report. The dataset is loaded once here and handed to every stage."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cnnforge.bench.results import BenchReport, results_as_json
from cnnforge.bench.sweep import benchmark
from cnnforge.conversion.export import ExportResult, export
from cnnforge.core.rundir import RunDir
from cnnforge.data.dataset import Dataset, load_dataset
from cnnforge.evaluation.evaluate import Evaluation, evaluate
from cnnforge.report.html import write_html_report
from cnnforge.report.markdown import write_report
from cnnforge.tuning.search import SearchConfig, SearchProgress, SearchResult, search

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
        dataset = load_dataset(config.data, val_fraction=config.val_fraction, seed=config.seed)
    keep_after = (
        max(AFTER_SEARCH_MIN_S, AFTER_SEARCH_SHARE * config.time_budget)
        if config.time_budget
        else 0
    )
    found = search(
        config, dataset=dataset, progress=progress, keep_after=keep_after, started=started
    )
    run_dir = RunDir(found.run_dir)
    stage("export")
    exported = export(run_dir.path, data=dataset)
    stage("bench")
    timing = benchmark(
        exported.onnx_path,
        batch_sizes=RUN_BATCH_SIZES,
        min_iterations=bench_iterations,
        min_duration_s=bench_min_duration_s,
        warmup=20,
        keras_model=found.best_model,
    )
    run_dir.write_json(run_dir.bench, results_as_json(timing))
    stage("evaluate")
    scored = evaluate(exported.onnx_path, dataset)
    run_dir.write_json(run_dir.evaluation, asdict(scored))
    stage("report")
    report = write_report(run_dir.path)
    write_html_report(run_dir.path, dataset)
    return RunResult(found, exported, timing, scored, report)
