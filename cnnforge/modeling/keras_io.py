"""Keras models on disk: a run directory or ``.keras`` file resolved with what its run knows,
loaded in Keras' safe mode, and made functional (what tf2onnx's ``from_keras`` needs)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnforge.core.errors import CnnforgeError
from cnnforge.core.preprocessing import Preprocessing
from cnnforge.core.rundir import RunDir


@dataclass(frozen=True)
class ExportSource:
    """A ``.keras`` file and what its run directory knows (data source, class names, the
    preprocessing its data was read with)."""

    keras_path: Path
    run_dir: Path | None
    data: str | None
    class_names: tuple[str, ...] | None
    preprocessing: Preprocessing | None = None


def resolve_source(source: Path | str) -> ExportSource:
    """A run directory (its ``best.keras``) or a ``.keras`` file, with its run's config if any."""
    path = Path(source)
    keras_path = RunDir(path).best_model if path.is_dir() else path
    if not keras_path.is_file():
        what = (
            f"run directory {path} has no {keras_path.name}"
            if path.is_dir()
            else f"{path} does not exist"
        )
        raise CnnforgeError(f"{what}; give a finished run directory or a .keras file")
    run = RunDir(keras_path.parent)
    if not run.is_run():
        return ExportSource(keras_path, None, None, None)
    config = run.read_config()
    return ExportSource(
        keras_path,
        run.path,
        config["search"]["data"],
        tuple(config["data_spec"]["class_names"]),
        run.read_preprocessing(),
    )


UNSAFE_ENV = "CNNFORGE_UNSAFE_DESERIALIZATION"


# Keras' legacy HDF5 loader: its safe mode has been bypassed (CVE-2025-9905), so safe mode
# refuses these files outright.
LEGACY_SUFFIXES = (".h5", ".hdf5")


def load_keras_model(path: Path, *, safe_mode: bool | None = None) -> Any:
    """Load a ``.keras`` file in Keras' safe mode (no deserialised Python lambdas) unless the user
    opted out (``--unsafe-deserialization`` / ``CNNFORGE_UNSAFE_DESERIALIZATION=1``); a legacy
    ``.h5`` file only then. A broken file is a one-line error."""
    import keras

    if safe_mode is None:
        safe_mode = not os.environ.get(UNSAFE_ENV)
    if safe_mode and str(path).lower().endswith(LEGACY_SUFFIXES):
        raise CnnforgeError(
            f"{path} is a legacy HDF5 model, which Keras cannot load safely; save it as .keras, "
            "or pass --unsafe-deserialization only if you trust it"
        )
    try:
        return keras.models.load_model(path, safe_mode=safe_mode)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "is it a complete .keras file?"
        if "safe_mode" in str(exc) or "lambda" in str(exc).lower():
            hint = "it holds Python code (a Lambda layer): pass --unsafe-deserialization only if you trust it"
        raise CnnforgeError(f"cannot load Keras model {path} ({reason[:160]}); {hint}") from None


def as_functional(model: Any) -> Any:
    """The same layers as a functional model (``from_keras`` needs one)."""
    import keras

    if isinstance(model, keras.Sequential):
        if not model.built or not model.inputs:
            raise CnnforgeError(
                "the Sequential model has no Input; build it with keras.Input first"
            )
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model
