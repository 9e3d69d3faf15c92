"""Shared fixtures. The example plugin package is installed for real (pip, into a temporary
target folder put on sys.path) before collection, so its entry point is discovered the way a
user's would be and its architecture gets the contract tests too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PACKAGE = ROOT / "examples" / "cnnforge-example-plugin"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def pytest_configure(config: pytest.Config) -> None:
    target = Path(tempfile.mkdtemp(prefix="cnnforge-example-plugin-"))
    config.add_cleanup(lambda: shutil.rmtree(target, ignore_errors=True))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE_PACKAGE),
        ],
        check=True,
        env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"},
    )
    sys.path.insert(0, str(target))
    import importlib

    importlib.invalidate_caches()
    import cnnforge

    cnnforge.load_plugins()


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 train and 200 test images of the bundled Fashion-MNIST subset, as an .npz source."""
    import cnnforge

    raw = cnnforge.get("dataset", "fashion_mnist_small").fn(None)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(
        path,
        x_train=raw.x_train[:400],
        y_train=raw.y_train[:400],
        x_test=raw.x_test[:200],
        y_test=raw.y_test[:200],
        class_names=np.array(raw.class_names),
    )
    return path


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, small_npz: Path):
    """A real two-trial search on small data, exported: the run directory many tests read."""
    from cnnforge.conversion.export import export
    from cnnforge.tuning.search import SearchConfig, search

    run_dir = tmp_path_factory.mktemp("runs") / "run"
    # KerasTuner's random search: its first trial is the plugin's default build (tests read it)
    config = SearchConfig(
        data=str(small_npz), run_dir=run_dir, tuner="random", max_trials=2, epochs=2, patience=0
    )
    result = search(config)
    export(run_dir)
    return result


@pytest.fixture(scope="session")
def deploy_run(finished_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the finished run (best.keras, config.json) to export variants into."""
    run_dir = tmp_path_factory.mktemp("deploy") / "run"
    run_dir.mkdir()
    for name in ("best.keras", "config.json"):
        shutil.copy(finished_run.run_dir / name, run_dir / name)
    return run_dir


# The test model is weak on purpose (two epochs on 360 images, ~47% accurate): its int8 variant
# agrees with Keras on ~96% of top-1 labels, so the tests set the agreement floor at 0.9.
TEST_MODEL_MIN_AGREEMENT = 0.9


@pytest.fixture(scope="session")
def variants(deploy_run: Path) -> dict:
    """int8, fp16 and NCHW float32 exports of the test model, at their default paths."""
    import warnings

    from cnnforge.conversion.export import export
    from cnnforge.core.errors import CnnforgeWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CnnforgeWarning)  # fp16 on CPU: checked in a test
        return {
            "fp32": export(deploy_run),
            "int8": export(
                deploy_run, precision="int8", min_top1_agreement=TEST_MODEL_MIN_AGREEMENT
            ),
            "fp16": export(deploy_run, precision="fp16"),
            "nchw": export(deploy_run, layout="NCHW"),
        }


@pytest.fixture
def postscript(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A looping EPS file's bytes (with Ghostscript installed, Pillow's EPS plugin would run
    ``gs`` on it for ever); reaching that plugin at all fails the test, Ghostscript or not."""
    from PIL import EpsImagePlugin

    def reached(*args, **kwargs):
        raise AssertionError("Pillow's EPS plugin was reached: it runs Ghostscript")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", reached)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", reached)
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n%%EndComments\n{ } loop\n"
