"""cnnforge: a labelled image dataset to a deployable, benchmarked ONNX classifier.

The plugin API (decorators, data types, readers) imports no TensorFlow. The stage functions
(``search``, ``export``, ``check_parity``, ``benchmark``, ``evaluate``, ``run``) and the
deployment API (``Classifier``, ``classify``, ``inspect_model``; no TensorFlow) are imported on
first use, so ``import cnnforge`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.core.preprocessing import Preprocessing
from cnnforge.core.version import __version__
from cnnforge.data import (
    Dataset,
    DataSpec,
    RawData,
    load_dataset,
    read_cifar,
    read_idx_folder,
    read_image_folder,
    read_npz,
    scan_image_folder,
)
from cnnforge.registry import (
    architecture,
    backbone,
    dataset,
    get,
    list_plugins,
    load_plugins,
    register,
)

_LAZY = {
    "SearchConfig": "cnnforge.tuning.search",
    "SearchResult": "cnnforge.tuning.search",
    "search": "cnnforge.tuning.search",
    "export": "cnnforge.conversion.export",
    "grouped_to_depthwise": "cnnforge.conversion.rewrite",
    "check_parity": "cnnforge.conversion.parity",
    "benchmark": "cnnforge.bench.sweep",
    "evaluate": "cnnforge.evaluation.evaluate",
    "run": "cnnforge.pipeline",
    "export_trial": "cnnforge.pipeline",
    "RunDir": "cnnforge.core.rundir",
    "explain": "cnnforge.report.explain",
    "write_html_report": "cnnforge.report.html",
    "write_reports": "cnnforge.report.reports",
    "Classifier": "cnnforge.deploy.predict",
    "Prediction": "cnnforge.deploy.predict",
    "classify": "cnnforge.deploy.predict",
    "inspect_model": "cnnforge.deploy.inspect",
}

__all__ = [
    "CnnforgeError",
    "CnnforgeWarning",
    "DataSpec",
    "Dataset",
    "Preprocessing",
    "RawData",
    "__version__",
    "architecture",
    "backbone",
    "dataset",
    "get",
    "list_plugins",
    "load_dataset",
    "load_plugins",
    "read_cifar",
    "read_idx_folder",
    "read_image_folder",
    "read_npz",
    "register",
    "scan_image_folder",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnforge' has no attribute {name!r}")
