"""Both reports of a run directory in one call: what ``cnnforge report`` rebuilds and what the
pipeline writes at the end of a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnnforge.core.rundir import RunDir
from cnnforge.data.dataset import Dataset
from cnnforge.report.figures import Missing, missing_artifacts
from cnnforge.report.html import write_html_report
from cnnforge.report.markdown import write_report


@dataclass(frozen=True)
class WrittenReports:
    markdown: Path  # report.md
    html: Path  # report.html
    # What the run directory lacks for a full report, what that leaves out, how to make it.
    missing: list[Missing]


def write_reports(run_dir: Path, dataset: Dataset | None = None) -> WrittenReports:
    """Write (or rewrite) report.md and report.html of ``run_dir`` from its files
    (``dataset``: the run's data, when the caller has it loaded already)."""
    markdown = write_report(run_dir)
    html = write_html_report(run_dir, dataset)
    return WrittenReports(markdown, html, missing_artifacts(run_dir, RunDir(run_dir).read()))
