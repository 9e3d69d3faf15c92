"""Hostile and broken input: each case exits non-zero with one line that names the problem, no
traceback, and no half-written artifact."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from cnnforge.cli import cli
from cnnforge.core.errors import CnnforgeError


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error:"), lines[0]
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def plugin_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "hostile_plugin.py"
    path.write_text("import cnnforge\nfrom keras import layers\n\n" + body)
    return path


def test_a_named_plugin_file_with_a_syntax_error_stops_the_command(tmp_path):
    bad = tmp_path / "typo_plugin.py"
    bad.write_text(
        "import cnnforge\n@cnnforge.architecture('typo_net')\ndef build(hp, x, spec)\n    return x\n"
    )
    # the search would not even use the broken file's plugin: it is refused all the same
    result = invoke(
        "--plugin", str(bad), "search", "--arch", "simple_cnn", "--run-dir", str(tmp_path / "r")
    )
    assert_refused(result, f"plugin file {bad}", "SyntaxError", "line 3")
    assert not (tmp_path / "r").exists()


def test_a_plugin_file_from_the_environment_that_raises_stops_the_command(tmp_path, monkeypatch):
    bad = tmp_path / "env_broken.py"
    bad.write_text("import cnnforge\n\nraise RuntimeError('no GPU here')\n")
    monkeypatch.setenv("CNNFORGE_PLUGINS", str(bad))
    result = invoke("plugins", "list")
    assert_refused(result, "from CNNFORGE_PLUGINS", "RuntimeError: no GPU here", "line 3")


def test_plugin_whose_build_raises_is_named_with_its_error(tmp_path, small_npz):
    plugin = plugin_file(
        tmp_path,
        "@cnnforge.architecture('raising_net')\ndef build(hp, x, spec):\n    raise ValueError('kernel too big')\n",
    )
    result = invoke(
        "--plugin",
        str(plugin),
        "search",
        "--arch",
        "raising_net",
        "--data",
        str(small_npz),
        "--run-dir",
        str(tmp_path / "r"),
    )
    assert_refused(
        result, "architecture plugin 'raising_net'", "failed to build", "ValueError: kernel too big"
    )
    assert not (tmp_path / "r").exists()


def test_plugin_returning_a_feature_map_is_refused(tmp_path, small_npz):
    plugin = plugin_file(
        tmp_path,
        "@cnnforge.architecture('map_net')\ndef build(hp, x, spec):\n    return layers.Conv2D(4, 3)(x)\n",
    )
    result = invoke(
        "--plugin",
        str(plugin),
        "search",
        "--arch",
        "map_net",
        "--data",
        str(small_npz),
        "--run-dir",
        str(tmp_path / "r"),
    )
    assert_refused(result, "'map_net' returned", "2-D (batch, features)")


@pytest.mark.slow
def test_trials_that_fail_are_recorded_and_many_in_a_row_stop_the_search(tmp_path, small_npz):
    plugin = plugin_file(
        tmp_path,
        "@cnnforge.architecture('flaky_net')\ndef build(hp, x, spec):\n"
        "    if hp.Int('attempt', 0, 1000, default=0):  # only the default build works\n"
        "        raise MemoryError('pretend out of memory')\n"
        "    return layers.GlobalAveragePooling2D()(layers.Conv2D(8, 3)(x))\n",
    )
    run_dir = tmp_path / "r"
    result = invoke(
        "--plugin",
        str(plugin),
        "search",
        "--arch",
        "flaky_net",
        "--tuner",
        "random",  # random draws: all but the default build fail, three in a row soon
        "--data",
        str(small_npz),
        "--run-dir",
        str(run_dir),
        "--max-trials",
        "8",
        "--epochs",
        "1",
    )
    assert_refused(
        result,
        "search stopped: 3 trial(s) failed, the last 3 in a row",
        "MemoryError: pretend out of memory",
        "trials.csv",
    )
    rows = (run_dir / "trials.csv").read_text().splitlines()[1:]
    assert len(rows) == 4 and ",COMPLETED," in rows[0]
    assert all(",FAILED," in row and "pretend out of memory" in row for row in rows[1:])


@pytest.mark.slow
def test_nan_loss_fails_the_trial_with_its_reason(tmp_path, small_npz):
    from cnnforge.tuning.search import SearchConfig, search

    config = SearchConfig(
        data=str(small_npz),
        run_dir=tmp_path / "r",
        max_trials=2,
        epochs=2,
        patience=0,
        fix={"learning_rate": "1e30", "conv_blocks": "1"},
    )
    with pytest.raises(CnnforgeError, match="no trial completed"):
        search(config)
    rows = (tmp_path / "r" / "trials.csv").read_text()
    assert (
        "FloatingPointError: loss became nan" in rows
        or "FloatingPointError: loss became inf" in rows
    )


def _images(folder: Path, names: list[str], size=(8, 8)) -> None:
    for name in names:
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full(size, 40 * i, np.uint8)).save(folder / name / f"{i}.png")


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda d: d.mkdir(), ["0 class folder(s)"]),
        (lambda d: _images(d, ["only"]), ["1 class folder(s)"]),
        (
            lambda d: (
                _images(d, ["a", "b"]),
                (d / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00"),
            ),
            ["cannot read image", "1.png"],
        ),
    ],
)
def test_broken_image_folders(make, fragments, tmp_path):
    make(tmp_path / "data")
    result = invoke(
        "search",
        "--data",
        f"dir:{tmp_path / 'data'}",
        "--run-dir",
        str(tmp_path / "r"),
        "--strict-data",
    )
    assert_refused(result, *fragments)
    assert not (tmp_path / "r").exists()


def test_truncated_image_is_refused(tmp_path):
    _images(tmp_path / "data", ["a", "b"], size=(64, 64))
    png = tmp_path / "data" / "b" / "2.png"
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    assert_refused(
        invoke("search", "--data", f"dir:{tmp_path / 'data'}", "--strict-data"),
        "cannot read image",
        "2.png",
    )


def test_truncated_keras_and_onnx_files(finished_run, tmp_path):
    keras_file, onnx_file = tmp_path / "cut.keras", tmp_path / "cut.onnx"
    keras_file.write_bytes((finished_run.run_dir / "best.keras").read_bytes()[:5000])
    onnx_file.write_bytes((finished_run.run_dir / "model.onnx").read_bytes()[:5000])
    assert_refused(invoke("export", str(keras_file)), "cannot load Keras model", "cut.keras")
    assert_refused(invoke("bench", str(onnx_file)), "cut.onnx")
    assert_refused(invoke("evaluate", str(onnx_file), "--data", "fashion_mnist_small"), "cut.onnx")
    assert files_under(tmp_path) == ["cut.keras", "cut.onnx"]


def test_onnx_external_data_outside_its_folder_is_refused(finished_run, tmp_path):
    model = onnx.load(finished_run.run_dir / "model.onnx")
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save_model(
        model,
        folder / "ext.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=1024,
    )
    assert (
        invoke("bench", str(folder / "ext.onnx"), "--iterations", "2", "--warmup", "0").exit_code
        == 0
    )
    proto = onnx.load(folder / "ext.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../etc/passwd"
    onnx.save_model(proto, folder / "evil.onnx")
    assert_refused(invoke("bench", str(folder / "evil.onnx")), "outside its folder", "refusing")


def test_unsafe_keras_lambda_is_not_deserialised(tmp_path, monkeypatch):
    import keras

    monkeypatch.setenv("CNNFORGE_UNSAFE_DESERIALIZATION", "")  # restored after the test

    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Dense(2, activation="softmax")(
        keras.layers.Flatten()(keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    )
    keras.Model(inputs, outputs).save(tmp_path / "lambda.keras")
    assert_refused_unless_trusted(
        tmp_path / "lambda.keras", "cannot load Keras model", "--unsafe-deserialization"
    )


def assert_refused_unless_trusted(model: Path, *words: str) -> None:
    """``cnnforge export MODEL`` refuses in one line naming ``words`` and writes nothing; with
    ``--unsafe-deserialization`` it exports."""
    result = invoke("export", str(model))
    assert_refused(result, model.name, *words)
    assert files_under(model.parent) == [model.name]
    trusted = CliRunner().invoke(cli, ["--unsafe-deserialization", "export", str(model)])
    assert trusted.exit_code == 0, trusted.stderr
    assert (model.parent / "model.onnx").is_file()


def test_legacy_h5_model_is_refused_in_safe_mode(tmp_path, monkeypatch):
    """Keras' HDF5 loader has had safe-mode bypasses (CVE-2025-9905): only on request."""
    import keras

    monkeypatch.setenv("CNNFORGE_UNSAFE_DESERIALIZATION", "")  # restored after the test
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "legacy.h5")
    assert_refused_unless_trusted(tmp_path / "legacy.h5", "HDF5", "--unsafe-deserialization")


def test_keras_floor_excludes_versions_with_published_safe_mode_bypasses():
    """CVE-2025-1550 (fixed in 3.9) and CVE-2025-9905 (fixed in 3.11.3)."""
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert re.findall(r'"keras(>=[^"]*)"', pyproject) == [">=3.11.3,<4"]


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 200 kB tmpfs: room for the run's small files but not for a model."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount_point)],
            capture_output=True,
        ).returncode
    ):
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_full_output_folder_leaves_nothing_half_written(finished_run, tiny_filesystem):
    out = tiny_filesystem / "model.onnx"
    assert_refused(
        invoke("export", str(finished_run.run_dir), "-o", str(out)), "No space left on device"
    )
    assert not out.exists()
    assert all(not name.startswith(".") for name in files_under(tiny_filesystem))


def test_read_only_output_folder(finished_run, tiny_filesystem):
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_filesystem)], check=True)
    result = invoke(
        "bench",
        str(finished_run.run_dir / "model.onnx"),
        "--iterations",
        "2",
        "--json",
        str(tiny_filesystem / "bench.json"),
    )
    assert_refused(result, "Read-only file system")
    assert files_under(tiny_filesystem) == []
