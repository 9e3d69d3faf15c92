"""The one place that wires the stages: search → export → parity → bench → evaluate → report."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cnnforge.bench.sweep import BenchReport, benchmark, results_as_json
from cnnforge.conversion.export import ExportResult, export
from cnnforge.core.atomic import atomic_write_text
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
        names = [
            "config.json",
            "trials.csv",
            "best.keras",
            "model.onnx",
            "parity.json",
            "bench.json",
            "evaluation.json",
            "report.md",
            "report.html",
        ]
        return {name: self.run_dir / name for name in names}


def run(
    config: SearchConfig,
    *,
    progress: SearchProgress | None = None,
    stage: Callable[[str], None] = lambda name: None,
    bench_iterations: int = 200,
    bench_min_duration_s: float = 1.0,
) -> RunResult:
    """Search, export the best model, check parity, benchmark it, evaluate it, and report."""
    stage("search")
    keep_after = (
        max(AFTER_SEARCH_MIN_S, AFTER_SEARCH_SHARE * config.time_budget)
        if config.time_budget
        else 0
    )
    found = search(config, progress=progress, keep_after=keep_after)
    stage("export")
    exported = export(found.run_dir, data=config.data)
    stage("bench")
    timing = benchmark(
        exported.onnx_path,
        batch_sizes=RUN_BATCH_SIZES,
        min_iterations=bench_iterations,
        min_duration_s=bench_min_duration_s,
        warmup=20,
        keras_model=found.best_model,
    )
    atomic_write_text(found.run_dir / "bench.json", json.dumps(results_as_json(timing), indent=2))
    stage("evaluate")
    scored = evaluate(exported.onnx_path, config.data)
    atomic_write_text(found.run_dir / "evaluation.json", json.dumps(asdict(scored), indent=2))
    stage("report")
    report = write_report(found.run_dir)
    write_html_report(found.run_dir)
    return RunResult(found, exported, timing, scored, report)
