"""The CLI through click's runner: the whole job, and bad input as one line with no traceback."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cnnforge.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error:") and "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_and_plugin_listing_do_not_import_tensorflow():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom cnnforge.cli import cli\n"
        "for args in (['--help'], ['plugins', 'list']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugins_list_and_show():
    listed = invoke("plugins", "list", "--kind", "architecture")
    assert listed.exit_code == 0
    assert (
        "simple_cnn" in listed.output
        and "resnet" in listed.output
        and "fashion_mnist" not in listed.output
    )
    shown = invoke("plugins", "show", "simple_cnn")
    assert shown.exit_code == 0
    for text in ("conv_blocks", "1 .. 4", "max, average", "learning_rate", "(log)"):
        assert text in shown.output


def test_plugins_show_prints_a_backbones_space():
    shown = invoke("plugins", "show", "mobilenet_v2")
    assert shown.exit_code == 0
    for text in (
        "native_size 224, min_size 32",
        "image_size",
        "128, 160, 192, 224",
        "avg, max",
        "dense_units_0",
        "dropout",
        "fine_tune_layers",
        "fine_tune_lr_factor",
        "fine_tune_epochs",
        "learning_rate",
    ):
        assert text in shown.output


def test_unknown_plugin_is_one_line_with_a_suggestion():
    assert_one_line_error(
        invoke("plugins", "show", "resnt"), "unknown plugin 'resnt'", "did you mean resnet"
    )


@pytest.mark.slow
def test_run_end_to_end_writes_every_artifact(small_npz, tmp_path):
    run_dir = tmp_path / "run"
    result = invoke(
        "run",
        "--data",
        str(small_npz),
        "--run-dir",
        str(run_dir),
        "--max-trials",
        "2",
        "--epochs",
        "1",
    )
    assert result.exit_code == 0, result.output + result.stderr
    for name in (
        "config.json",
        "trials.csv",
        "best.keras",
        "model.onnx",
        "parity.json",
        "bench.json",
        "evaluation.json",
        "report.md",
        "report.html",
    ):
        assert (run_dir / name).is_file(), name
        assert str(run_dir / name) in result.output
    assert "test accuracy (onnxruntime)" in result.output
    bench = json.loads((run_dir / "bench.json").read_text())
    assert [r["batch_size"] for r in bench if r["runtime"] == "onnxruntime"] == [1, 32]
    report = (run_dir / "report.md").read_text()
    for heading in ("## Summary", "## Trials", "## Export parity", "## Latency", "## Test split"):
        assert heading in report
    assert not list(run_dir.glob(".*tmp*")), "temporary files left behind"


@pytest.mark.slow
def test_run_with_a_backbone_end_to_end(small_npz, tmp_path):
    run_dir = tmp_path / "run"
    result = invoke(
        "run",
        "--data",
        str(small_npz),
        "--run-dir",
        str(run_dir),
        "--backbone",
        "mobilenet_v3_small",
        "--weights",
        "none",
        "--max-trials",
        "1",
        "--epochs",
        "1",
        "--no-retrain",  # the trial's model is deployed: a whole backbone traced once, not twice
    )
    assert result.exit_code == 0, result.output + result.stderr
    # random weights: the image size starts from the data's 28x28, not the native 224
    assert "--weights none: image_size 32" in result.output
    assert next(csv.DictReader((run_dir / "trials.csv").open()))["hp_image_size"] == "32"
    assert "test accuracy (onnxruntime)" in result.output
    config = json.loads((run_dir / "config.json").read_text())["search"]
    assert (config["backbone"], config["weights"], config["arch"]) == (
        "mobilenet_v3_small",
        "none",
        None,
    )
    assert json.loads((run_dir / "parity.json").read_text())["passed"]
    assert "backbone: `mobilenet_v3_small` (weights: none)" in (run_dir / "report.md").read_text()


def test_export_bench_evaluate_commands(finished_run, small_npz, tmp_path):
    out = tmp_path / "exported.onnx"
    exported = invoke("export", str(finished_run.run_dir), "-o", str(out))
    assert exported.exit_code == 0 and out.is_file() and "parity: max abs diff" in exported.output
    benched = invoke(
        "bench",
        str(out),
        "--batch-sizes",
        "1,2",
        "--iterations",
        "5",
        "--warmup",
        "1",
        "--min-duration",
        "0.05",
        "--no-peak",
        "--json",
        str(tmp_path / "b.json"),
    )
    assert benched.exit_code == 0
    assert [r["batch_size"] for r in json.loads((tmp_path / "b.json").read_text())] == [1, 2]
    evaluated = invoke(
        "evaluate", str(out), "--data", str(small_npz), "--json", str(tmp_path / "e.json")
    )
    assert evaluated.exit_code == 0 and "accuracy" in evaluated.output
    assert "ECE" in evaluated.output and "at 90% coverage" in evaluated.output
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["images"] == 200 and {"ece", "nll", "brier", "selective_accuracy"} <= set(scores)


def test_export_calibrate_says_what_it_fitted(finished_run, tmp_path):
    out = tmp_path / "calibrated.onnx"
    result = invoke("export", str(finished_run.run_dir), "-o", str(out), "--calibrate")
    assert result.exit_code == 0, result.output + result.stderr
    assert "calibration: temperature" in result.output and "ECE" in result.output
    assert "'unknown' below knn_cosine (output ood_score)" in result.output


def test_export_calibrate_of_a_label_smoothed_model_says_it_took_the_smoothing_off(
    finished_run, small_npz, tmp_path
):
    """A .keras file a user compiled with label smoothing, exported through the CLI."""
    import keras

    model = keras.models.load_model(finished_run.run_dir / "best.keras", compile=False)
    model.compile(loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1))
    model.save(tmp_path / "mine.keras")
    out = tmp_path / "mine.onnx"
    args = ["-o", str(out), "--calibrate", "--data", str(small_npz)]
    result = invoke("export", str(tmp_path / "mine.keras"), *args)
    assert result.exit_code == 0, result.output + result.stderr
    assert "label smoothing 0.1 taken off first" in result.output.replace("\n", " ")
    assert out.is_file() and "Traceback" not in result.output + result.stderr


def test_report_rebuilds_both_reports_and_names_what_is_missing(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run_dir)
    result = invoke("report", str(run_dir))
    assert result.exit_code == 0, result.output + result.stderr
    for name in ("report.md", "report.html"):
        assert (run_dir / name).is_file() and f"wrote {run_dir / name}" in result.output
    assert "missing bench.json: no latency measurements" in result.stderr


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["search", "--data", "dir:/no/such/folder"],
            ["image folder /no/such/folder does not exist"],
        ),
        (["search", "--arch", "simple_cnm"], ["did you mean simple_cnn"]),
        (["search", "--data", "fashion_mnist_smal"], ["did you mean fashion_mnist_small"]),
        (["bench", "missing.onnx"], ["missing.onnx does not exist"]),
        (["bench", "compare", "a.json", "b.json"], ["a.json do not exist"]),
        (["export", "missing.keras"], ["missing.keras does not exist"]),
        (["report", "."], ["not a cnnforge run directory"]),
        (["search", "--backbone", "mobilenetv2"], ["did you mean mobilenet_v2"]),
        (
            ["search", "--backbone", "mobilenet_v2", "--weights", "/no/such.h5"],
            ["weights file /no/such.h5 does not exist", "--weights imagenet, none"],
        ),
        (
            ["search", "--backbone", "mobilenet_v2", "--weights", "none", "--fix", "image_size=16"],
            ["at least 32x32 pixels, got image_size=16", "resizes every image"],
        ),
        (["search", "--backbone", "run:/no/such/run"], ["/no/such/run does not exist"]),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, fragments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke(*args), *fragments)
    assert not (tmp_path / "runs").exists(), "nothing is written on bad input"


@pytest.mark.parametrize(
    "args",
    [
        ["search", "--max-trials", "-1"],
        ["search", "--epochs", "0"],
        ["search", "--tuner", "annealing"],
        ["bench", "m.onnx", "--batch-sizes", "1,x"],
        ["bench", "m.onnx", "--min-iterations", "0"],
        ["bench", "m.onnx", "--min-duration", "0"],
        ["bench", "m.onnx", "--threads", "0"],
        ["bench", "m.onnx", "--shape", "3xx4"],
        ["bench", "compare", "only-one.json"],
        ["search", "--fix", "conv_blocks"],
        ["search", "--arch", "resnet", "--backbone", "mobilenet_v2"],
        ["search", "--weights", "none"],
    ],
)
def test_nonsense_flag_values_are_usage_errors(args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output + result.stderr


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNFORGE_DEBUG", "")  # --debug sets it for the process; restored after
    result = CliRunner().invoke(cli, ["--debug", "bench", str(tmp_path / "missing.onnx")])
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "CnnforgeError"


def test_bench_sweep_outputs_and_the_regression_gate(tmp_path):
    import tiny_onnx

    models = [
        tiny_onnx.save(
            tiny_onnx.conv_classifier(metadata={"cnnforge.precision": p}), tmp_path / f"{p}.onnx"
        )
        for p in ("fp32", "int8")
    ]
    out = tmp_path / "out"
    benched = invoke(
        "bench",
        *map(str, models),
        "--threads",
        "1,2",
        "--batch-sizes",
        "1,2",
        "--min-iterations",
        "5",
        "--min-duration",
        "0.01",
        "--warmup",
        "1",
        "--no-spinning",
        "--out",
        str(out),
        "--csv",
        str(tmp_path / "b.csv"),
        "--markdown",
        str(tmp_path / "b.md"),
    )
    assert benched.exit_code == 0, benched.output + benched.stderr
    for text in ("Peak:", "spinning off", "Best thread count", "fp32", "int8", "GFLOP/s"):
        assert text in benched.output
    for name in (
        "bench.json",
        "bench.csv",
        "bench.md",
        "latency_vs_batch.png",
        "latency_distribution.png",
    ):
        assert (out / name).is_file() and str(out / name) in benched.output
    assert (tmp_path / "b.csv").is_file() and (tmp_path / "b.md").is_file()
    rows = json.loads((out / "bench.json").read_text())
    assert len(rows) == 8 and {r["spinning"] for r in rows} == {False}

    same = invoke("bench", "compare", str(out / "bench.json"), str(out / "bench.json"))
    assert same.exit_code == 0 and "passed" in same.output and "ratio CI" in same.output
    for row in rows:  # every new interval starts 1.5x above the base interval's top
        high = row["p50_ci_ms"][1]
        row["latency_ms"]["p50"], row["p50_ci_ms"] = 1.75 * high, [1.5 * high, 2 * high]
    (tmp_path / "slow.json").write_text(json.dumps(rows))
    slower = invoke(
        "bench",
        "compare",
        str(out / "bench.json"),
        str(tmp_path / "slow.json"),
        "--max-slowdown",
        "10%",
    )
    assert slower.exit_code == 1 and "slower" in slower.output
    assert "FAILED: 8 cell(s) slower than 10%" in slower.stderr
    lenient = invoke(
        "bench",
        "compare",
        str(out / "bench.json"),
        str(tmp_path / "slow.json"),
        "--max-slowdown",
        "150%",
    )
    assert lenient.exit_code == 0


def test_bench_help_and_explicit_run_subcommand(tmp_path):
    import tiny_onnx

    helped = invoke("bench", "--help")
    assert (
        helped.exit_code == 0 and "--min-duration" in helped.output and "compare" in helped.output
    )
    model = tiny_onnx.save(tiny_onnx.conv_classifier(batch=1), tmp_path / "fixed.onnx")
    ran = invoke(
        "bench", "run", str(model), "--min-iterations", "3", "--min-duration", "0.01", "--no-peak"
    )
    assert ran.exit_code == 0 and "fixed" in ran.output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--providers", "tpu"], ["unknown provider 'tpu'", "choose one of cpu, cuda, tensorrt"]),
        (["--batch-sizes", "4"], ["fixed batch size of 1", "--batch-sizes 1"]),
        (["--shape", "x=3x8x8"], ["does not fit input 'x'"]),
    ],
)
def test_bench_bad_input_is_one_line(tmp_path, args, fragments):
    import tiny_onnx

    model = tiny_onnx.save(tiny_onnx.conv_classifier(batch=1), tmp_path / "fixed.onnx")
    assert_one_line_error(invoke("bench", str(model), "--no-peak", *args), *fragments)


def test_bench_compare_bad_threshold_is_one_line(tmp_path):
    (tmp_path / "a.json").write_text(
        json.dumps(
            [
                {
                    "runtime": "onnxruntime",
                    "batch_size": 1,
                    "provider": "cpu",
                    "threads": 1,
                    "latency_ms": {"p50": 1.0},
                }
            ]
        )
    )
    result = invoke(
        "bench",
        "compare",
        str(tmp_path / "a.json"),
        str(tmp_path / "a.json"),
        "--max-slowdown",
        "lots",
    )
    assert_one_line_error(result, "percentage like 10%")


def test_bench_compare_with_a_zero_median_is_one_line(tmp_path):
    row = {
        "runtime": "onnxruntime",
        "model": "fp32",
        "batch_size": 1,
        "provider": "cpu",
        "threads": 1,
        "latency_ms": {"p50": 1.0},
        "p50_ci_ms": [0.9, 1.1],
    }
    good, zero = tmp_path / "good.json", tmp_path / "bench.json"
    good.write_text(json.dumps([row]))
    zero.write_text(json.dumps([{**row, "latency_ms": {"p50": 0}, "p50_ci_ms": [0, 0]}]))
    for base, new in ((zero, good), (good, zero), (zero, zero)):
        result = invoke("bench", "compare", str(base), str(new))
        assert_one_line_error(result, f"{zero}: cell (model fp32,", "median of 0 ms")


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_plugins_show_prints_the_space_of_every_architecture_shape():
    tutorial = str(EXAMPLES / "kerastuner_tutorial.py")
    shown = invoke("--plugin", tutorial, "plugins", "show", "build_model")
    assert shown.exit_code == 0, shown.output
    for text in ("build(hp) -> keras.Model", "pixels scaled to 0..1", "num_layers", "units_0"):
        assert text in shown.output
    assert "learning_rate" not in shown.output  # compiled: its own Adam and "lr"
    assert "training recipe: the model's own (batch 32)" in shown.output  # Keras's default
    shapes = str(Path(__file__).resolve().parents[1] / "contract" / "shape_plugins.py")
    for name, texts in {
        "shape_hypermodel_class": (
            "keras_tuner.HyperModel",
            "training recipe: the model's own fit()",
            "units",
        ),
        "shape_model_spec": (
            "build(hp, spec) -> keras.Model",
            "training recipe: the model's own (batch 32)",
            "lr",
            "filters",
        ),
        "shape_features": (
            "build(hp, inputs, spec) -> features",
            "training recipe: cnnforge's",
            "filters",
            "learning_rate",
        ),
    }.items():
        shown = invoke("--plugin", shapes, "plugins", "show", name)
        assert shown.exit_code == 0, shown.output
        for text in texts:
            assert text in shown.output, (name, text)


@pytest.mark.slow
def test_the_kerastuner_tutorial_runs_as_written_with_only_the_decorator(small_npz, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cnnforge.cli",
            "--plugin",
            str(EXAMPLES / "kerastuner_tutorial.py"),
            "run",
            "--arch",
            "build_model",
            "--data",
            str(small_npz),
            "--run-dir",
            str(run_dir),
            "--max-trials",
            "2",
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    parity = json.loads((run_dir / "parity.json").read_text())
    assert parity["passed"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["search"]["arch"] == "build_model"
    assert (run_dir / "model.onnx").is_file() and (run_dir / "report.md").is_file()


def test_warnings_and_errors_keep_their_brackets(capsys):
    """Rich would read ``cnnforge[mlflow]`` as markup and drop it from the line."""
    import warnings

    from cnnforge.cli.output import show_warning
    from cnnforge.core.errors import CnnforgeWarning

    show_warning(warnings.showwarning, "pip install 'cnnforge[mlflow]'", CnnforgeWarning, "f", 1)
    assert "cnnforge[mlflow]" in capsys.readouterr().err


def test_version_is_printed_from_a_source_checkout_that_is_not_installed(monkeypatch):
    """Run from a checkout on PYTHONPATH (as the GPU machine did), no package metadata exists:
    --version must still print the version, not raise click's "not installed" RuntimeError."""
    import importlib.metadata

    from cnnforge import __version__

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"cnnforge, version {__version__}"
