"""cnnforge: a labelled image dataset to a deployable, benchmarked ONNX classifier.

The plugin API (decorators, data types, readers) imports no TensorFlow. The stage functions
(``search``, ``export``, ``check_parity``, ``benchmark``, ``evaluate``, ``run``) and the
deployment API (``Classifier``, ``classify``, ``inspect_model``; no TensorFlow) are imported on
first use, so ``import cnnforge`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from cnnforge.data import (
    Dataset,
    DataSpec,
    RawData,
    load_dataset,
    read_cifar,
    read_idx_folder,
    read_image_folder,
    read_npz,
)
from cnnforge.errors import CnnforgeError, CnnforgeWarning
from cnnforge.registry import (
    architecture,
    backbone,
    dataset,
    get,
    list_plugins,
    load_plugins,
    register,
)

__version__ = "0.1.0"

_LAZY = {
    "SearchConfig": "cnnforge.search",
    "SearchResult": "cnnforge.search",
    "search": "cnnforge.search",
    "export": "cnnforge.export",
    "check_parity": "cnnforge.parity",
    "benchmark": "cnnforge.bench",
    "evaluate": "cnnforge.evaluate",
    "run": "cnnforge.pipeline",
    "explain": "cnnforge.explain",
    "write_html_report": "cnnforge.report_html",
    "Classifier": "cnnforge.predict",
    "Prediction": "cnnforge.predict",
    "classify": "cnnforge.predict",
    "inspect_model": "cnnforge.inspect",
}

__all__ = [
    "CnnforgeError",
    "CnnforgeWarning",
    "DataSpec",
    "Dataset",
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
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnforge' has no attribute {name!r}")
