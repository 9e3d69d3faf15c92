"""Both reports of a run directory in one call: what ``cnnforge report`` rebuilds and what the
pipeline writes at the end of a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnnforge.report.figures import Missing, missing_artifacts
from cnnforge.report.html import write_html_report
from cnnforge.report.markdown import read_run, write_report


@dataclass(frozen=True)
class WrittenReports:
    markdown: Path  # report.md
    html: Path  # report.html
    # What the run directory lacks for a full report, what that leaves out, how to make it.
    missing: list[Missing]


def write_reports(run_dir: Path) -> WrittenReports:
    """Write (or rewrite) report.md and report.html of ``run_dir`` from its files."""
    markdown = write_report(run_dir)
    html = write_html_report(run_dir)
    return WrittenReports(markdown, html, missing_artifacts(run_dir, read_run(run_dir)))
