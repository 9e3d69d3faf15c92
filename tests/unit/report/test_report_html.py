"""report.html: the Markdown it shares with report.md, the trials table, a run that is not
finished, and the real page opened in headless Chromium (every image loaded, no console errors,
no network), with a screenshot kept as an artefact."""

from __future__ import annotations

import base64
import contextlib
import csv
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cnnforge.bench.results import results_as_json
from cnnforge.bench.sweep import benchmark
from cnnforge.cli import cli
from cnnforge.conversion.export import export
from cnnforge.evaluation.evaluate import evaluate
from cnnforge.report.html import markdown_to_html, trials_table, write_html_report
from cnnforge.report.markdown import write_report

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)


@pytest.fixture(scope="module")
def reported_run(finished_run, small_npz, tmp_path_factory) -> Path:
    """A copy of the finished run with its evaluation and a short benchmark, both reports written."""
    run_dir = tmp_path_factory.mktemp("reported") / "run"
    shutil.copytree(finished_run.run_dir, run_dir)
    export(run_dir, calibrate=True)  # its figures show before and after the temperature
    scored = evaluate(run_dir / "model.onnx", str(small_npz))
    (run_dir / "evaluation.json").write_text(json.dumps(asdict(scored)))
    timing = benchmark(
        run_dir / "model.onnx",
        batch_sizes=(1,),
        warmup=1,
        min_iterations=5,
        min_duration_s=0.05,
        peak=False,
    )
    (run_dir / "bench.json").write_text(json.dumps(results_as_json(timing)))
    write_report(run_dir)
    write_html_report(run_dir)
    return run_dir


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]*)"', page)


def test_markdown_of_report_md_becomes_html():
    lines = [
        "- a `val_accuracy` line with **bold**",
        "- and <b>",
        "",
        "| name | score |\n|---|---|\n| x\\|y | 0.5 |",
        "",
        "_Not measured yet._",
    ]
    assert markdown_to_html(lines) == (
        "<ul><li>a <code>val_accuracy</code> line with <strong>bold</strong></li>"
        "<li>and &lt;b&gt;</li></ul>\n"
        '<div class="scroll"><table><thead><tr><th>name</th><th>score</th></tr></thead>'
        '<tbody><tr><td>x|y</td><td class="num">0.5</td></tr></tbody></table></div>\n'
        "<p><em>Not measured yet.</em></p>"
    )


def test_trials_table_best_first_with_sort_keys():
    trials = [
        {
            "trial_id": "0",
            "status": "COMPLETED",
            "score": "0.5",
            "params": "100",
            "hp_lr": "0.001",
            "message": "",
        },
        {
            "trial_id": "1",
            "status": "FAILED",
            "score": "",
            "params": "",
            "hp_lr": "0.01",
            "message": "OOM",
        },
        {
            "trial_id": "2",
            "status": "COMPLETED",
            "score": "0.75",
            "params": "90",
            "hp_lr": "0.1",
            "message": "",
        },
    ]
    table = trials_table(trials, "val_accuracy", best_id="2")
    headers = re.findall(r"<th>([^<]*)</th>", table)
    assert headers == ["trial", "status", "val_accuracy", "params", "lr", "message"]
    rows = re.findall(r"<tr( class=best)?><td[^>]*>(\d+)</td>", table)
    assert rows == [(" class=best", "2"), ("", "0"), ("", "1")]  # failed trial last
    assert '<td class="num" data-sort="0.001">0.001</td>' in table


def test_the_page_of_a_finished_run(reported_run):
    page = (reported_run / "report.html").read_text()
    for heading in (
        "Summary",
        "Trials",
        "Training of the winner",
        "Export parity",
        "Latency",
        "Test split",
        "What the model learned",
    ):
        assert f"<h2>{heading}</h2>" in page
    assert _images(page) == [
        "val_accuracy of each trial",
        "val_accuracy against latency_ms",  # every search measures its candidates' latency
        f"training and validation curves of trial {json.loads((reported_run / 'search.json').read_text())['trial_id']}",
        "confusion matrix on the test split",
        "precision and recall per class",
        "reliability diagram on the test split",
        "accuracy against coverage on the test split",
        "misclassified test images",
        "filters and feature maps for test image 0",
    ]
    assert "Missing from this run" not in page and "T-shirt/top" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the page must not need a network"
    assert (reported_run / "report.md").read_text().count("## ") == 5  # report.md stays
    markdown = (reported_run / "report.md").read_text()
    assert "Calibration: ECE" in markdown
    assert re.search(
        r"Temperature \d\.\d+ in the graph: the argmax unchanged on 200 of 200", markdown
    )
    assert re.search(r"`ood_score` in the graph: within \S+ of NumPy's on \d+ held-out", markdown)


def test_a_run_without_a_finished_search_reports_what_there_is(finished_run, tmp_path):
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    shutil.copy(finished_run.run_dir / "config.json", run_dir / "config.json")
    shutil.copytree(finished_run.run_dir / "tuner", run_dir / "tuner")
    _with_latency_column(finished_run.run_dir / "trials.csv", run_dir / "trials.csv")
    result = CliRunner().invoke(cli, ["report", str(run_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    assert "missing search.json" in result.stderr and "cnnforge export" in result.stderr
    page = (run_dir / "report.html").read_text()
    assert "Missing from this run" in page and "the search has not finished" in page
    assert "best trial so far" in page  # the curves of the best trial until now
    assert "No <code>best.keras</code> yet" in page
    assert _images(page) == [
        "val_accuracy of each trial",
        "val_accuracy against latency_ms",  # appears once the search measures latency
        f"training and validation curves of trial {finished_run.best_trial.trial_id}",
    ]
    assert "Pareto front" in page


def test_the_report_says_which_front_the_plot_and_the_table_show(finished_run, tmp_path):
    run_dir = tmp_path / "sized"
    run_dir.mkdir()
    shutil.copy(finished_run.run_dir / "config.json", run_dir / "config.json")
    shutil.copytree(finished_run.run_dir / "tuner", run_dir / "tuner")
    with (finished_run.run_dir / "trials.csv").open() as f:
        rows = sorted(csv.DictReader(f), key=lambda r: -float(r["score"]))
    assert len(rows) == 2 and rows[0]["score"] != rows[1]["score"]
    # the worse trial is slower too, but smaller: on the front only once size counts
    for row, latency, size, pareto in ((rows[0], "1.0", "2.0", "1"), (rows[1], "2.0", "0.5", "1")):
        row.update(latency_ms=latency, size_mb=size, pareto=pareto)
    with (run_dir / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_html_report(run_dir)
    page = (run_dir / "report.html").read_text()
    best, smaller = rows[0]["trial_id"], rows[1]["trial_id"]
    assert f"and latency ({best})" in page
    assert f"once ONNX size counts too ({smaller})" in page
    assert "<th>pareto (with size)</th>" in page


def _with_latency_column(source: Path, target: Path) -> None:
    with source.open() as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row["latency_ms"] = str(1.0 + i)
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# --- headless Chromium over the DevTools protocol (--remote-debugging-pipe, stdlib only) --------


def _above_4(fd: int) -> int:
    """The same pipe end on a descriptor the shell's ``3<&N 4>&M`` cannot clobber."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Chromium:
    """Chromium driven through fds 3 (commands in) and 4 (replies out), NUL-delimited JSON."""

    def __init__(self, profile: Path) -> None:
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()
        to_browser, from_browser = _above_4(to_browser), _above_4(from_browser)
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
        ]
        # bash puts the pipes on fds 3 and 4 (no preexec_fn: this process runs threads).
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}', CHROMIUM, *flags],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=(profile.parent / "chromium.log").open("wb"),
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self.events = b"", 0, []

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._read(deadline - time.monotonic()))

    def _read(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            ready, _, _ = select.select(
                [self._replies], [], [], max(0, deadline - time.monotonic())
            )
            if not ready:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError):
            self.call("Browser.close")
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._commands)
        os.close(self._replies)


def _problems(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions, failed loads and any request off the disk."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            found.append(f"console.{params['type']}: {params['args']}")
        elif method == "Runtime.exceptionThrown":
            found.append(f"exception: {params['exceptionDetails']}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(f"log: {params['entry']['text']}")
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("data:", "file:")):
                found.append(f"network request: {url}")
        elif method == "Network.loadingFailed":
            found.append(f"failed load: {params.get('errorText')}")
    return found


IMAGES_JS = (
    "JSON.stringify(Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]))"
)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_html_renders_in_headless_chromium(reported_run, tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            browser.call(f"{domain}.enable", session)
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        browser.call("Page.navigate", session, url=(reported_run / "report.html").as_uri())
        browser.wait_for("Page.loadEventFired")

        images = json.loads(
            browser.call("Runtime.evaluate", session, expression=IMAGES_JS)["result"]["value"]
        )
        assert len(images) == 9
        assert [alt for alt, complete, width in images if not (complete and width > 0)] == []

        # The trials table sorts: click "trial" once, ascending ids.
        order = browser.call(
            "Runtime.evaluate",
            session,
            expression=(
                "document.querySelector('table.sortable th').click();"
                "JSON.stringify(Array.from(document.querySelectorAll('table.sortable tbody tr'))"
                ".map(r => r.cells[0].textContent))"
            ),
        )["result"]["value"]
        assert json.loads(order) == sorted(json.loads(order), key=int)

        size = browser.call("Page.getLayoutMetrics", session)["cssContentSize"]
        shot = browser.call(
            "Page.captureScreenshot",
            session,
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
        browser.call("Runtime.evaluate", session, expression="1")  # flush pending events
    finally:
        browser.close()
    screenshot = tmp_path / "report.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    print(f"\nscreenshot of report.html: {screenshot}")
    assert _problems(browser.events) == []
    assert screenshot.stat().st_size > 50_000 and size["height"] > 3000
