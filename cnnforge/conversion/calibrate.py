"""A fitted temperature inside the exported graph, so every runtime returns calibrated
probabilities; and where the held-out probabilities it is fitted on come from.

The graph's softmax output ``p`` is followed by ``Softmax(Log(Max(p, 1e-30)) / T)``: ``log p``
is the logits up to a per-image constant, which softmax ignores, so this is the model's softmax
at temperature ``T`` whatever the graph before it (any precision variant, any exporter). Dividing
by ``T > 0`` keeps the order of the classes: the argmax does not change (checked on the parity
images at export).

Which held-out data: the final model of a run is trained again on train+validation, so no
labelled split is left that it did not see but the test split, which stays for evaluation. The
temperature is therefore fitted on the validation predictions of the winning trial's own model
(trained on the training split only), saved by the search as ``heldout.npz``. A model outside a
run, a trial's model, or a run without that file is fitted on the validation split predicted by
the model itself, which must not have trained on it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict
from typing import Any

import numpy as np

from cnnforge.conversion.parity import keras_outputs, onnx_outputs
from cnnforge.core import calibration
from cnnforge.core.contract import OUTPUT_NAME
from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.core.rundir import RunDir
from cnnforge.deploy.runtime import open_session, to_layout
from cnnforge.modeling.keras_io import ExportSource

UNCALIBRATED = "probabilities_uncalibrated"


def with_temperature(proto: Any, temperature: float) -> Any:
    """A copy of ``proto`` whose ``probabilities`` output is the softmax at ``temperature``."""
    from onnx import helper, numpy_helper

    if temperature <= 0:
        raise CnnforgeError(f"temperature must be positive, not {temperature}")
    scaled = copy.deepcopy(proto)
    graph = scaled.graph
    for node in graph.node:
        node.output[:] = [UNCALIBRATED if name == OUTPUT_NAME else name for name in node.output]
        node.input[:] = [UNCALIBRATED if name == OUTPUT_NAME else name for name in node.input]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(calibration.LOG_FLOOR, np.float32), "cal_floor"),
            numpy_helper.from_array(np.array(temperature, np.float32), "cal_temperature"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Max", [UNCALIBRATED, "cal_floor"], ["cal_floored"]),
            helper.make_node("Log", ["cal_floored"], ["cal_log"]),
            helper.make_node("Div", ["cal_log", "cal_temperature"], ["cal_scaled"]),
            helper.make_node("Softmax", ["cal_scaled"], [OUTPUT_NAME], axis=1),
        ]
    )
    return scaled


def heldout_probabilities(
    source: ExportSource, dataset: Any, model: Any
) -> tuple[np.ndarray, np.ndarray, str]:
    """Held-out probabilities, their labels, and what they are (the module says which)."""
    run = RunDir(source.run_dir) if source.run_dir else None
    if run is not None and source.keras_path == run.best_model and run.heldout.is_file():
        with np.load(run.heldout) as saved:
            return saved["probabilities"], saved["labels"], str(saved["source"])
    if dataset is None or len(dataset.y_val) == 0:
        raise CnnforgeError(
            f"calibrating {source.keras_path} needs a labelled validation split it did not "
            "train on; give --data"
        )
    if run is not None and source.keras_path == run.best_model and _retrained(run):
        warnings.warn(
            f"{run.path} has no {run.heldout.name}: the temperature is fitted on the validation "
            "split its final model trained on, so it corrects less than it should",
            CnnforgeWarning,
            stacklevel=3,
        )
    probabilities = keras_outputs(model, dataset.x_val, 256)[0]
    what = f"validation split of {dataset.spec.name}, predicted by the exported model"
    return probabilities, dataset.y_val, what


def _retrained(run: RunDir) -> bool:
    return run.search.is_file() and bool(run.read_json(run.search).get("final_training"))


def fit(
    probabilities: np.ndarray, labels: np.ndarray, source: str, acceptance: float
) -> dict[str, Any]:
    """The temperature and the "not one of the classes" threshold, as the metadata records them:
    ``probability_calibration`` and ``unknown_threshold``."""
    classes = probabilities.shape[1]
    if len(labels) == 0 or labels.max() >= classes:
        raise CnnforgeError(f"held-out labels ({source}) do not fit a model of {classes} classes")
    fitted = calibration.calibrate(probabilities, labels, source)
    calibrated = calibration.rescale(probabilities, fitted.temperature)
    threshold = calibration.acceptance_threshold(
        calibration.max_probability(calibrated), acceptance
    )
    return {
        "probability_calibration": asdict(fitted),
        "unknown_threshold": {
            "score": "max_probability",
            "threshold": threshold,
            "acceptance": acceptance,
            "source": source,
        },
    }


def check_argmax(
    uncalibrated: bytes, calibrated: bytes, images: np.ndarray, layout: str, provider: str
) -> dict[str, Any]:
    """The calibrated graph on ``images`` next to the uncalibrated one: the share of unchanged
    argmaxes (must be 1) and the largest difference from the temperature applied in NumPy."""
    batch = to_layout(images, layout)
    before = onnx_outputs(open_session(uncalibrated, provider=provider), batch, 64)[0]
    after = onnx_outputs(open_session(calibrated, provider=provider), batch, 64)[0]
    temperature = _temperature_of(calibrated)
    expected = calibration.rescale(before, temperature)
    return {
        "temperature": temperature,
        "images": len(images),
        "argmax_unchanged": float(np.mean(before.argmax(1) == after.argmax(1))),
        "max_abs_diff_from_numpy": float(np.abs(after - expected).max()),
    }


def _temperature_of(model: bytes) -> float:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model).graph
    value = next(i for i in graph.initializer if i.name == "cal_temperature")
    return float(numpy_helper.to_array(value))
