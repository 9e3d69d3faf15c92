"""onnxruntime benchmark: statistics on known inputs, real sweeps over tiny models, the Keras
baseline, and bad input as one clear error. No timed asserts."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tiny_onnx

from cnnforge.bench.baseline import device_kind
from cnnforge.bench.machine import measure_peak
from cnnforge.bench.models import describe_model, parse_shape
from cnnforge.bench.results import results_as_json
from cnnforge.bench.sweep import benchmark
from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.timing import latency_stats, median_ci, time_calls

FAST = {"warmup": 1, "min_iterations": 6, "min_duration_s": 0.01}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An fp32 and an 'int8'-labelled NHWC classifier, and an NCHW fixed-batch one."""
    folder = tmp_path_factory.mktemp("onnx")
    return {
        "fp32": tiny_onnx.save(
            tiny_onnx.conv_classifier(layout="NHWC", metadata={"cnnforge.precision": "fp32"}),
            folder / "model.onnx",
        ),
        "int8": tiny_onnx.save(
            tiny_onnx.conv_classifier(layout="NHWC", metadata={"cnnforge.precision": "int8"}),
            folder / "model_int8.onnx",
        ),
        "nchw_b2": tiny_onnx.save(
            tiny_onnx.conv_classifier(layout="NCHW", batch=2), folder / "torch_like.onnx"
        ),
    }


def test_latency_stats_of_known_timings():
    stats = latency_stats([0.001, 0.002, 0.003, 0.004, 0.010])
    assert stats["min"] == pytest.approx(1.0) and stats["max"] == pytest.approx(10.0)
    assert stats["p50"] == pytest.approx(3.0) and stats["mean"] == pytest.approx(4.0)
    assert stats["std"] == pytest.approx(3.5355, rel=1e-3)
    thousand = latency_stats(np.arange(1, 1001) / 1e3)  # 1..1000 ms
    assert thousand["p90"] == pytest.approx(900.1) and thousand["p99"] == pytest.approx(990.01)
    assert thousand["p99.9"] == pytest.approx(999.001)


@pytest.mark.parametrize(
    ("n", "ranks", "coverage"),
    # The classic order-statistic table for the median at 95 %.
    [
        (5, (1, 5), 0.9375),
        (6, (1, 6), 0.96875),
        (10, (2, 9), 0.9785),
        (100, (40, 61), 0.9648),
        (1000, (469, 532), 0.9537),
    ],
)
def test_median_interval_ranks_match_the_binomial_table(n, ranks, coverage):
    rng = np.random.default_rng(n)
    samples = rng.permutation(np.arange(1, n + 1, dtype=float))  # x(k) == k
    low, high, covered = median_ci(samples)
    assert (low, high) == ranks
    assert covered == pytest.approx(coverage, abs=5e-5)


def test_median_interval_covers_the_true_median_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true_median = np.log(2)  # of an exponential(1): skewed, like latencies
    hits = [
        low <= true_median <= high
        for low, high, _ in (median_ci(rng.exponential(size=60)) for _ in range(2000))
    ]
    assert 0.94 <= np.mean(hits) <= 0.99


def test_time_calls_runs_until_both_minimums():
    calls = []
    started = time.perf_counter()
    times = time_calls(lambda: calls.append(1), warmup=3, iterations=5, min_duration_s=0.02)
    assert time.perf_counter() - started >= 0.02
    assert len(times) >= 5 and len(calls) == len(times) + 3
    assert len(time_calls(lambda: None, warmup=0, iterations=7)) == 7


def test_sweep_over_models_threads_and_batch_sizes(models):
    report = benchmark(
        [models["fp32"], models["int8"]], batch_sizes=(1, 3), threads=(1, 2), peak=True, **FAST
    )
    assert [(r.model, r.threads, r.batch_size) for r in report.results] == [
        (label, threads, batch)
        for label in ("fp32", "int8")
        for threads in (1, 2)
        for batch in (1, 3)
    ]
    flops = tiny_onnx.conv_classifier_flops()
    peaks = {p.threads: p.gflops for p in report.peaks}
    assert set(peaks) == {1, 2} and all(g > 0 for g in peaks.values())
    for r in report.results:
        s = r.latency_ms
        assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["p99.9"] <= s["max"]
        assert r.p50_ci_ms[0] <= s["p50"] <= r.p50_ci_ms[1] and r.ci_coverage >= 0.95
        assert r.iterations >= 6 and len(r.samples_ms) == r.iterations and r.spinning is True
        assert r.throughput == pytest.approx(r.batch_size / s["mean"] * 1e3)
        assert r.gflops == pytest.approx(flops * r.batch_size / s["p50"] * 1e3 / 1e9)
        assert r.peak_share == pytest.approx(r.gflops / peaks[r.threads])
    best = report.best_threads()
    assert [(b["model"], b["batch_size"]) for b in best] == [
        ("fp32", 1),
        ("fp32", 3),
        ("int8", 1),
        ("int8", 3),
    ]
    assert all(b["threads"] in (1, 2) and b["compared"] == 2 for b in best)

    rows = results_as_json(report)
    first = rows[0]
    assert {
        "batch_size",
        "provider",
        "threads",
        "latency_ms",
        "throughput",
        "p50_ci_ms",
        "spinning",
        "io_binding",
        "gflops",
        "peak_share",
        "sweep",
        "environment",
    } <= set(first)
    assert set(first["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "mean", "std", "min", "max"}
    assert "samples_ms" not in first and first["model_path"] == str(models["fp32"])
    sweep = first["sweep"]
    assert sweep["threads"] == [1, 2] and sweep["batch_sizes"] == [1, 3]
    assert [m["label"] for m in sweep["models"]] == ["fp32", "int8"]
    assert sweep["models"][0]["layout"] == "NHWC" and sweep["models"][0]["flops_per_image"] == flops
    assert [p["threads"] for p in sweep["peaks"]] == [1, 2] and "MatMul" in sweep["peaks"][0][
        "what"
    ]
    env = first["environment"]
    assert (
        env["onnxruntime"]
        and env["cores"] >= 1
        and "CPUExecutionProvider" in env["available_providers"]
    )
    assert len(env["load_average_before"]) == 3 and len(env["load_average_after"]) == 3


def test_spinning_off_and_io_binding_are_recorded(models):
    report = benchmark(
        models["fp32"],
        batch_sizes=(2,),
        threads=1,
        spinning=False,
        io_binding=True,
        peak=False,
        **FAST,
    )
    (result,) = report.results
    assert result.spinning is False and result.io_binding is True and result.peak_share is None
    assert report.sweep["spinning"] is False and report.sweep["io_binding"] is True


def test_model_from_another_tool_nchw_with_a_fixed_batch(models):
    described = describe_model(models["nchw_b2"])
    assert described.layout == "NCHW" and described.batch_sizes == (2,)
    assert described.label == "torch_like" and described.precision is None
    assert (
        described.flops_per_image == tiny_onnx.conv_classifier_flops()
    )  # per image, not per batch
    report = benchmark(models["nchw_b2"], threads=1, peak=False, **FAST)
    assert [r.batch_size for r in report.results] == [2]
    with pytest.raises(CnnforgeError, match="fixed batch size of 2.*--batch-sizes 2"):
        benchmark(models["nchw_b2"], batch_sizes=(1, 8), peak=False, **FAST)


def test_labels_that_clash_fall_back_to_file_names(tmp_path):
    paths = [
        tiny_onnx.save(
            tiny_onnx.conv_classifier(metadata={"cnnforge.precision": "fp32"}),
            tmp_path / f"{name}.onnx",
        )
        for name in ("a", "b")
    ]
    report = benchmark(paths, batch_sizes=(1,), threads=1, peak=False, **FAST)
    assert [r.model for r in report.results] == ["a:fp32", "b:fp32"]


@pytest.mark.slow
def test_keras_own_export_benchmarks(tmp_path):
    import keras

    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    model(np.zeros((1, 12, 12, 3), np.float32))  # keras' exporter needs a model that was called
    path = tmp_path / "keras_export.onnx"
    model.export(str(path), format="onnx")
    report = benchmark(path, batch_sizes=(1, 2), threads=1, peak=False, **FAST)
    assert report.models[0].layout == "NHWC" and [r.batch_size for r in report.results] == [1, 2]
    assert report.models[0].flops_per_image == 2 * (10 * 10 * 4 * 27 + 4 * 3)


def test_non_image_model_runs_with_shape(tmp_path):
    path = tiny_onnx.save(tiny_onnx.token_model(16), tmp_path / "tokens.onnx")
    with pytest.raises(CnnforgeError, match=r"2 inputs \(ids, mask\).*give --shape"):
        benchmark(path, peak=False, **FAST)
    with pytest.raises(CnnforgeError, match="name each: --shape NAME=DIMS"):
        benchmark(path, shapes={None: (16,)}, peak=False, **FAST)
    with pytest.raises(CnnforgeError, match="input 'mask' .* add --shape mask=DIMS"):
        benchmark(path, shapes={"ids": (16,)}, peak=False, **FAST)
    with pytest.raises(CnnforgeError, match="--shape names idz, but .* has inputs ids, mask"):
        benchmark(path, shapes={"idz": (16,), "mask": (16,)}, peak=False, **FAST)
    with pytest.raises(CnnforgeError, match="does not fit input 'ids'"):
        benchmark(path, shapes={"ids": (8,), "mask": (16,)}, peak=False, **FAST)
    with pytest.raises(CnnforgeError, match="needs 1 per-item dims"):
        benchmark(path, shapes={"ids": (4, 4), "mask": (16,)}, peak=False, **FAST)
    report = benchmark(
        path,
        shapes={"ids": (16,), "mask": (16,)},
        batch_sizes=(1, 4),
        threads=1,
        peak=False,
        **FAST,
    )
    assert [r.batch_size for r in report.results] == [1, 4] and report.models[0].layout is None
    assert report.models[0].flops_per_image is None and report.results[0].gflops is None


def test_input_that_does_not_fit_is_one_clear_error(tmp_path):
    path = tiny_onnx.save(tiny_onnx.batch_one_reshape(4), tmp_path / "reshape.onnx")
    report = benchmark(path, shapes={None: (4,)}, batch_sizes=(1,), peak=False, **FAST)
    assert report.results[0].batch_size == 1
    with pytest.raises(CnnforgeError, match=r"does not run on x \[2, 4\] float32 .*--batch-sizes"):
        benchmark(path, shapes={None: (4,)}, batch_sizes=(2,), peak=False, **FAST)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("3x224x224", (None, (3, 224, 224))),
        ("ids=128", ("ids", (128,))),
        ("x=1,28,28", ("x", (1, 28, 28))),
    ],
)
def test_parse_shape(text, parsed):
    assert parse_shape(text) == parsed


@pytest.mark.parametrize("text", ["", "3xx4", "0x3", "=3", "a=b"])
def test_parse_shape_refuses_nonsense(text):
    with pytest.raises(CnnforgeError, match=r"is not \[NAME=\]DIMS"):
        parse_shape(text)


def test_peak_microbenchmark_reports_what_it_measured():
    peak = measure_peak("cpu", 1, sizes=(32, 64), min_iterations=3, min_duration_s=0.01)
    assert peak.gflops > 0 and peak.calls >= 6 and peak.matrix_size in (32, 64)
    assert peak.what.startswith("onnxruntime fp32 MatMul N x N by a constant N x N, N in 32, 64,")
    assert f"at N = {peak.matrix_size}" in peak.what


def test_benchmark_with_keras_baseline(finished_run):
    run_dir = finished_run.run_dir
    report = benchmark(
        run_dir / "model.onnx",
        batch_sizes=(1, 4),
        threads=1,
        peak=True,
        keras_model=run_dir / "best.keras",
        **FAST,
    )
    assert [r.batch_size for r in report.results] == [1, 4]
    assert {r.runtime for r in report.keras} == {"keras tf.function"}
    assert [r.model for r in report.results] == ["fp32"] * 2  # the export's precision metadata
    for r in report.keras:
        assert r.iterations >= 6 and r.threads is None and r.gflops and r.peak_share
    keras_p50 = {k.batch_size: k.latency_ms["p50"] for k in report.keras}
    speedups = report.speedups()
    assert set(speedups) == {("fp32", "cpu", 1, 1), ("fp32", "cpu", 1, 4)}
    for r in report.results:
        assert r.speedup_vs_keras == pytest.approx(keras_p50[r.batch_size] / r.latency_ms["p50"])
    assert report.environment["tensorflow"] and report.sweep["keras_model"] == "best.keras"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_iterations": 0}, "min iterations >= 2"),
        ({"warmup": -1}, "warmup >= 0"),
        ({"min_duration_s": 0}, "min duration must be > 0 s"),
        ({"min_duration_s": -1.0}, "min duration must be > 0 s"),
        ({"batch_sizes": (0,)}, "positive integers"),
        ({"threads": 0}, "threads must be at least 1"),
        ({"providers": "tpu"}, "unknown provider 'tpu'; choose one of cpu, cuda, tensorrt"),
        ({"providers": ("cpu", "cpu")}, "give each provider once"),
    ],
)
def test_nonsense_settings_are_refused(models, kwargs, message):
    with pytest.raises(CnnforgeError, match=message):
        benchmark(models["fp32"], **{"peak": False, **kwargs})


def test_missing_provider_names_what_is_installed(models):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is installed here")
    with pytest.raises(
        CnnforgeError, match=r"not available .*onnxruntime \d.* installed.* install onnxruntime-gpu"
    ):
        benchmark(models["fp32"], providers=("cpu", "cuda"))


def test_bad_model_files_are_clear_errors(tmp_path, models):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(
        CnnforgeError, match=r"cannot parse ONNX model .*bad.onnx .*complete .onnx file"
    ):
        benchmark(bad)
    with pytest.raises(CnnforgeError, match=r"empty.onnx has an empty graph"):
        benchmark(empty)
    with pytest.raises(CnnforgeError, match=r"missing.onnx does not exist"):
        benchmark(tmp_path / "missing.onnx")
    with pytest.raises(CnnforgeError, match="given twice"):
        benchmark([models["fp32"], models["fp32"]])


def test_device_kind_of_tensorflow_devices():
    assert device_kind("/job:localhost/replica:0/task:0/device:GPU:0") == "gpu"
    assert device_kind("/job:localhost/replica:0/task:0/device:CPU:0") == "cpu"
    assert device_kind("") == "cpu"


def test_keras_speedups_compare_each_model_with_its_own_baseline(tmp_path):
    """Two exports of one Keras model, one model exported from another .keras file and one
    taking other images, in one sweep with the Keras baseline."""
    import shutil
    from dataclasses import replace

    import keras

    from cnnforge.bench.baseline import add_speedups
    from cnnforge.conversion.export import export

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    net = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    net.save(tmp_path / "net.keras")
    shutil.copy(tmp_path / "net.keras", tmp_path / "other.keras")
    paths = [
        export(tmp_path / "net.keras", tmp_path / "a.onnx").onnx_path,
        export(tmp_path / "net.keras", tmp_path / "b.onnx", layout="NCHW").onnx_path,
        tiny_onnx.save(  # same input, but exported from another file: not this baseline's
            tiny_onnx.conv_classifier(
                layout="NHWC",
                metadata={
                    "cnnforge.source": str(tmp_path / "other.keras"),
                    "cnnforge.precision": "int8",
                },
            ),
            tmp_path / "foreign.onnx",
        ),
        tiny_onnx.save(tiny_onnx.conv_classifier(layout="NHWC", size=12), tmp_path / "small.onnx"),
    ]
    report = benchmark(
        paths,
        batch_sizes=(1, 2),
        threads=1,
        peak=False,
        keras_model=tmp_path / "net.keras",
        **FAST,
    )
    exported = ["a:fp32", "b:fp32"]
    assert [m.label for m in report.models] == [*exported, "foreign:int8", "small"]
    keras_p50 = {k.batch_size: k.latency_ms["p50"] for k in report.keras}
    for r in report.results:
        if r.model in exported:
            assert r.speedup_vs_keras == pytest.approx(
                keras_p50[r.batch_size] / r.latency_ms["p50"]
            )
        else:
            assert r.speedup_vs_keras is None, r.model
    assert set(report.speedups()) == {(m, "cpu", 1, b) for m in exported for b in (1, 2)}
    assert report.sweep["keras_baseline_of"] == exported
    # TensorFlow runs on this machine's CPU: the Keras rows say so
    assert {k.provider for k in report.keras} == {"cpu"}
    assert "CPU" in report.environment["keras_device"]
    flops = report.models[0].flops_per_image  # the Keras model does its exports' work
    for k in report.keras:
        assert k.gflops == pytest.approx(flops * k.batch_size / (k.latency_ms["p50"] / 1e3) / 1e9)

    # A baseline TensorFlow ran on a GPU is no baseline for a cpu cell.
    on_gpu = [replace(k, provider="gpu") for k in report.keras]
    add_speedups(report.results, on_gpu, dict.fromkeys(exported, "net.keras"))
    assert all(r.speedup_vs_keras is None for r in report.results)
