"""Shared fixtures and the suite's guards.

The example plugin package is installed for real (pip, into a temporary target folder put on
sys.path) before collection, so its entry point is discovered the way a user's would be and its
architecture gets the contract tests too. Under pytest-xdist the controller installs it once and
the workers reuse that folder.

Two guards keep the suite fast (docs/testing.md): each xdist worker's TensorFlow thread pools
are sized to its share of the cores, and a test of the fast tier (not marked ``slow``) whose call
takes longer than ``FAST_TEST_CEILING_S`` fails, so a slow test cannot creep into the everyday
tier unnoticed. Once the tests are collected, what the imports made is frozen out of the
garbage collector's sight, so the collections Keras and KerasTuner run every trial stay cheap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PACKAGE = ROOT / "examples" / "cnnforge-example-plugin"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
PLUGIN_TARGET_ENV = "CNNFORGE_TEST_EXAMPLE_PLUGIN"

# A fast-tier test's call may take this long on a busy 2-core CI machine (two xdist workers);
# a heavier check is marked ``@pytest.mark.slow`` and still runs in CI.
FAST_TEST_CEILING_S = float(os.environ.get("CNNFORGE_FAST_TEST_CEILING_S", "45"))
# Memory one worker may need at its peak (a backbone's conversion); bounds `-n auto`.
WORKER_MEMORY_GB = 8


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _size_worker_thread_pools() -> None:
    """Give each xdist worker's TensorFlow (and the subprocesses its tests start) its share of the
    cores: two workers with a full pool each on two cores oversubscribe them. Must run before
    TensorFlow is imported; a value set by hand wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        share = max(1, _usable_cpus() // workers)
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(share))
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", "2")
        os.environ.setdefault("OMP_NUM_THREADS", str(share))


_size_worker_thread_pools()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, as many as the memory holds."""
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(_usable_cpus(), int(memory_gb // WORKER_MEMORY_GB)))


def _install_example_plugin(config: pytest.Config) -> Path:
    shared = os.environ.get(PLUGIN_TARGET_ENV)
    if shared and Path(shared).is_dir():  # an xdist worker: the controller installed it
        return Path(shared)
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
    os.environ[PLUGIN_TARGET_ENV] = str(target)  # workers start after this and inherit it
    return target


def pytest_configure(config: pytest.Config) -> None:
    target = _install_example_plugin(config)
    sys.path.insert(0, str(target))
    import importlib

    importlib.invalidate_caches()
    import cnnforge

    cnnforge.load_plugins()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what the imports made (~380,000 objects: TensorFlow, Keras, tf2onnx) out of the
    garbage collector's sight: Keras' ``clear_session`` and KerasTuner call ``gc.collect()``
    two or three times a trial, and each call spent ~0.4 s walking them (a fifth of a search
    test's time in a profile). Objects made later are collected as before."""
    import gc

    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Fail a fast-tier test whose call ran over the ceiling (its setup, often a shared
    session fixture paid once, is not counted)."""
    outcome = yield
    report = outcome.get_result()
    over = call.when == "call" and call.duration > FAST_TEST_CEILING_S
    if over and report.passed and item.get_closest_marker("slow") is None:
        report.outcome = "failed"
        report.longrepr = (
            f"fast-tier test took {call.duration:.1f} s, over the {FAST_TEST_CEILING_S:.0f} s "
            "ceiling (tests/conftest.py FAST_TEST_CEILING_S): make it cheaper or mark it "
            "@pytest.mark.slow"
        )


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


class LazyExports(Mapping):
    """Exports built on first use, each once: a worker whose tests read only the float32 model
    does not pay for int8's calibration."""

    def __init__(self, builders: dict[str, Callable[[], Any]]) -> None:
        self._builders = builders
        self._built: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._built:
            self._built[key] = self._builders[key]()
        return self._built[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


@pytest.fixture(scope="session")
def variants(deploy_run: Path) -> Mapping:
    """float32, int8, fp16 and NCHW float32 exports of the test model, at their default paths."""
    import warnings

    from cnnforge.conversion.export import export
    from cnnforge.core.errors import CnnforgeWarning

    def exporting(**options: Any) -> Callable[[], Any]:
        def build() -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CnnforgeWarning)  # fp16 on CPU: a test checks it
                return export(deploy_run, **options)

        return build

    return LazyExports(
        {
            "fp32": exporting(),
            "int8": exporting(precision="int8", min_top1_agreement=TEST_MODEL_MIN_AGREEMENT),
            "fp16": exporting(precision="fp16"),
            "nchw": exporting(layout="NCHW"),
        }
    )


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
