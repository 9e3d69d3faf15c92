"""Bench outputs (CSV, Markdown, plots) from a real small run, and the regression gate on
crafted results: passes, fails, and the case where only the intervals keep it from failing."""

from __future__ import annotations

import csv
import io
import json

import pytest
import tiny_onnx

from cnnforge.bench import output as bench_output
from cnnforge.bench.compare import compare, comparison_rows, load_results, parse_slowdown
from cnnforge.bench.results import results_as_json
from cnnforge.bench.sweep import benchmark
from cnnforge.core.errors import CnnforgeError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tiny_onnx.save(
        tiny_onnx.conv_classifier(layout="NHWC", metadata={"cnnforge.precision": "fp32"}),
        tmp_path_factory.mktemp("onnx") / "model.onnx",
    )
    return benchmark(
        path,
        batch_sizes=(1, 2, 4),
        threads=(1, 2),
        warmup=1,
        min_iterations=20,
        min_duration_s=0.01,
    )


def test_every_output_is_written(report, tmp_path):
    written = bench_output.write_outputs(report, tmp_path / "out")
    assert sorted(p.name for p in written.values()) == [
        "bench.csv",
        "bench.json",
        "bench.md",
        "latency_distribution.png",
        "latency_vs_batch.png",
    ]
    for plot in ("latency plot", "distribution plot"):
        data = written[plot].read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000
    assert len(json.loads(written["json"].read_text())) == 6
    rows = list(csv.DictReader(io.StringIO(written["csv"].read_text())))
    assert len(rows) == 6 and list(rows[0]) == bench_output.CSV_COLUMNS
    first = report.results[0]
    assert float(rows[0]["p50_ms"]) == pytest.approx(first.latency_ms["p50"])
    assert float(rows[0]["p50_ci_low_ms"]) == pytest.approx(first.p50_ci_ms[0])
    assert float(rows[0]["p99.9_ms"]) == pytest.approx(first.latency_ms["p99.9"])
    markdown = written["markdown"].read_text()
    assert "| runtime | model | threads | batch | p50 ms | p50 95% CI |" in markdown
    assert "## Best thread count" in markdown and "Peak: " in markdown
    assert markdown.count("| onnxruntime cpu | fp32 |") == 6
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_table_rows_are_formatted_for_people(report):
    rows = results_as_json(report)
    table = bench_output.table_rows(rows)
    assert len(table) == 6 and all(len(r) == len(bench_output.TABLE_HEADERS) for r in table)
    runtime, model, threads, batch, p50, ci, *_, share, speedup, runs = table[0]
    assert (runtime, model, threads, batch) == ("onnxruntime cpu", "fp32", "1", "1")
    assert "–" in ci and share.endswith("%") and speedup == "" and int(runs) >= 20
    best = bench_output.best_thread_rows(rows)
    assert [b[2] for b in best] == ["1", "2", "4"] and all(b[3] in ("1", "2") for b in best)


def test_distribution_cell_is_the_fastest_at_the_smallest_batch(report):
    cell = bench_output.distribution_cell(report)
    assert cell.batch_size == 1
    assert cell.latency_ms["p50"] == min(
        r.latency_ms["p50"] for r in report.results if r.batch_size == 1
    )


@pytest.mark.parametrize(
    ("value", "number"), [(0.0123456, "0.0123"), (1.23456, "1.23"), (1234.5, "1234"), (None, "")]
)
def test_number_keeps_three_significant_digits(value, number):
    assert bench_output.number(value) == number


# --- the regression gate ---------------------------------------------------------------------


def result(p50, ci=None, *, batch=1, threads=1, model="fp32"):
    row = {
        "runtime": "onnxruntime",
        "model": model,
        "provider": "cpu",
        "threads": threads,
        "batch_size": batch,
        "latency_ms": {"p50": p50},
    }
    if ci:
        row["p50_ci_ms"] = list(ci)
    return row


def test_identical_results_pass():
    base = [result(1.0, (0.98, 1.02), batch=1), result(4.0, (3.9, 4.1), batch=8)]
    outcome = compare(base, base, 0.10)
    assert outcome.passed and [c.verdict for c in outcome.cells] == ["same", "same"]


def test_a_clear_slowdown_fails():
    outcome = compare([result(1.0, (0.98, 1.02))], [result(1.5, (1.47, 1.52))], 0.10)
    (cell,) = outcome.cells
    assert not outcome.passed and cell.verdict == "slower" and outcome.slower == [cell]
    assert cell.ratio == pytest.approx(1.5)
    assert cell.ratio_interval == pytest.approx((1.47 / 1.02, 1.52 / 0.98))


def test_a_slower_median_whose_intervals_overlap_does_not_fail():
    # Medians 20 % apart, but the new interval reaches down to the base's: not shown by this run.
    outcome = compare([result(1.0, (0.95, 1.05))], [result(1.2, (1.0, 1.4))], 0.10)
    (cell,) = outcome.cells
    assert outcome.passed and cell.verdict == "slower?"
    assert cell.ratio_interval[0] < 1.10 < cell.ratio


def test_a_small_real_slowdown_under_the_threshold_passes():
    outcome = compare([result(1.0, (0.999, 1.001))], [result(1.05, (1.049, 1.051))], 0.10)
    assert outcome.passed and outcome.cells[0].verdict == "same"
    assert not compare([result(1.0, (0.999, 1.001))], [result(1.05, (1.049, 1.051))], 0.03).passed


def test_faster_cells_and_cells_in_one_file_only():
    base = [result(2.0, (1.9, 2.1), batch=1), result(3.0, (2.9, 3.1), batch=2)]
    new = [result(1.0, (0.9, 1.1), batch=1), result(9.0, (8.9, 9.1), batch=4)]
    outcome = compare(base, new, 0.10)
    assert [(c.key[4], c.verdict) for c in outcome.cells] == [
        (1, "faster"),
        (2, "only in base"),
        (4, "only in new"),
    ]
    assert outcome.passed
    rows = comparison_rows(outcome)
    assert rows[0] == ["fp32", "ort cpu", "1", "1", "2.00", "1.00", "0.500", "0.43–0.58", "faster"]
    assert rows[1][5:] == ["", "", "", "only in base"]


def test_results_without_intervals_compare_medians():
    assert compare([result(1.0)], [result(1.2)], 0.10).cells[0].verdict == "slower"
    assert compare([result(1.0)], [result(1.05)], 0.10).cells[0].verdict == "same"


@pytest.mark.parametrize(
    ("text", "value"), [("10%", 0.10), ("0.1", 0.1), ("150%", 1.5), ("0%", 0.0)]
)
def test_parse_slowdown(text, value):
    assert parse_slowdown(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["ten", "10", "-5%", "%"])
def test_parse_slowdown_refuses_nonsense(text):
    with pytest.raises(CnnforgeError, match="percentage like 10%"):
        parse_slowdown(text)


def test_load_results_explains_wrong_files(tmp_path):
    with pytest.raises(CnnforgeError, match="do not exist"):
        load_results(tmp_path / "missing.json")
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(CnnforgeError, match="is not JSON"):
        load_results(tmp_path / "text.json")
    (tmp_path / "other.json").write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(CnnforgeError, match="not a list of cnnforge bench results"):
        load_results(tmp_path / "other.json")
    (tmp_path / "ok.json").write_text(json.dumps([result(1.0)]))
    assert load_results(tmp_path / "ok.json") == [result(1.0)]


def test_compact_tables_fit_a_terminal_and_drop_empty_columns(report):
    tables = bench_output.compact_tables(results_as_json(report))
    assert [title for title, _, _ in tables] == ["fp32: onnxruntime cpu (ms)"]
    _, headers, rows = tables[0]
    assert "×Keras" not in headers and headers[:3] == ["threads", "batch", "p50"]
    assert len(rows) == 6 and all(len(r) == len(headers) for r in rows)


@pytest.mark.parametrize(("base", "new"), [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0)])
def test_a_zero_median_on_either_side_is_one_clear_line(base, new):
    side = "base" if base == 0 else "new"
    with pytest.raises(CnnforgeError) as caught:
        compare([result(base, (base, base))], [result(new, (new, new))], 0.10)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{side}: cell (model fp32, onnxruntime cpu, threads 1, batch 1)")
    assert "median of 0.0 ms" in message and "measure that cell again" in message
