"""onnxruntime benchmark: real sessions, statistics that hold together, the Keras baseline."""

from __future__ import annotations

import pytest

from cnnforge.bench import benchmark, latency_stats, results_as_json
from cnnforge.errors import CnnforgeError


def test_latency_stats_of_known_timings():
    stats = latency_stats([0.001, 0.002, 0.003, 0.004, 0.010])
    assert stats["min"] == pytest.approx(1.0) and stats["max"] == pytest.approx(10.0)
    assert stats["p50"] == pytest.approx(3.0) and stats["mean"] == pytest.approx(4.0)
    assert stats["std"] == pytest.approx(3.5355, rel=1e-3)


def test_benchmark_with_keras_baseline(finished_run):
    run_dir = finished_run.run_dir
    report = benchmark(run_dir / "model.onnx", batch_sizes=(1, 4), warmup=2, iterations=20,
                       threads=1, keras_model=run_dir / "best.keras")  # fmt: skip
    assert [r.batch_size for r in report.results] == [1, 4]
    for r in report.results + report.keras:
        s = r.latency_ms
        assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
        assert r.iterations == 20 and r.throughput == pytest.approx(r.batch_size / s["mean"] * 1e3)
    assert {r.runtime for r in report.keras} == {"keras tf.function"}
    assert set(report.speedups()) == {1, 4}

    rows = results_as_json(report)
    first = rows[0]
    assert {"batch_size", "provider", "threads", "latency_ms", "throughput"} <= set(first)
    assert set(first["latency_ms"]) == {"p50", "p90", "p99", "mean", "std", "min", "max"}
    assert first["provider"] == "cpu" and first["threads"] == 1
    assert first["environment"]["onnxruntime"] and first["environment"]["cores"] >= 1
    assert first["speedup_vs_keras"] == pytest.approx(report.speedups()[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"iterations": 0}, "iterations >= 2"),
        ({"warmup": -1}, "warmup >= 0"),
        ({"batch_sizes": (0,)}, "positive integers"),
        ({"threads": 0}, "threads must be at least 1"),
        ({"provider": "tpu"}, "unknown provider 'tpu'"),
    ],
)
def test_nonsense_settings_are_refused(finished_run, kwargs, message):
    with pytest.raises(CnnforgeError, match=message):
        benchmark(finished_run.run_dir / "model.onnx", **kwargs)


def test_missing_provider_names_what_is_installed(finished_run):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is installed here")
    with pytest.raises(CnnforgeError, match="not available .* install onnxruntime-gpu"):
        benchmark(finished_run.run_dir / "model.onnx", provider="cuda")


def test_corrupt_onnx_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(CnnforgeError, match=r"onnxruntime cannot load .*bad.onnx"):
        benchmark(bad)
