"""A fitted temperature and a "not one of the classes" score inside the exported graph, so
every runtime returns calibrated probabilities and the score; and which held-out images they are
fitted on.

Temperature: the graph's softmax output ``p`` is followed by ``Softmax(Log(Max(p, 1e-30)) / T)``:
``log p`` is the logits up to a per-image constant, which softmax ignores, so this is the
model's softmax at temperature ``T`` whatever the graph before it (any precision variant, any
exporter). Dividing by ``T > 0`` keeps the order of the classes: the argmax does not change
(checked on the parity images at export).

Score: a second output ``ood_score``, the cosine similarity of the image's penultimate features
(the input of the final Dense layer) to its k-th nearest neighbour among a bank of training
images' features (Sun et al., ICML 2022). On a default run's model it told scikit-learn's
digits from Fashion-MNIST at AUROC 0.969 and uniform noise at 0.981, where the maximum
probability gave 0.919 and 0.826, the energy 0.961 and 0.867 and a Mahalanobis distance of the
same features 0.696 and 0.896 (docs/calibration.md). A graph whose last Dense layer cannot be
found keeps the maximum probability as its score.

Which held-out data: the final model of a run trains on train+validation less a calibration
slice (``data.dataset.calibration_slice``), saved in ``heldout.npz`` as indices; the
temperature and the threshold are fitted on the exported graph's own outputs for those images.
Without a final training the exported model is a trial's, and the validation split is its
held-out data. A ``.keras`` file outside a run is fitted on the validation split (it must not
have trained on it). A run saved before the slice carries the winning trial's probabilities
instead: its temperature comes from them and its score stays the maximum probability.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cnnforge.conversion.parity import onnx_outputs
from cnnforge.core import calibration
from cnnforge.core.contract import OOD_OUTPUT_NAME, OUTPUT_NAME
from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.core.rundir import RunDir
from cnnforge.data.dataset import Dataset, stratified_split
from cnnforge.deploy.runtime import open_session, prediction_batch_size, to_layout
from cnnforge.modeling.keras_io import ExportSource

UNCALIBRATED = "probabilities_uncalibrated"
FEATURES = "ood_features"
KNN = "knn_cosine"
MAX_PROBABILITY = "max_probability"
# The bank of training features in the graph: at most this many images and bytes; k is this
# share of the bank. On the default run's model, banks of 500 to 5000 images (k at 0.5 % of
# them) told digits from Fashion-MNIST at AUROC 0.967 to 0.970 and noise at 0.981 to 0.985:
# the bank is kept small for the graph's size and latency.
BANK_IMAGES = 2000
BANK_BYTES = 8 * 2**20
K_SHARE = 0.005
# Ops between the final Dense layer's MatMul/Gemm and the softmax (bias, precision casts).
PASS_THROUGH = ("Add", "Cast", "Identity", "DequantizeLinear", "QuantizeLinear")
QUANTIZING = ("DequantizeLinear", "QuantizeLinear", "Cast")


def with_temperature(proto: Any, temperature: float, label_smoothing: float = 0.0) -> Any:
    """A copy of ``proto`` whose ``probabilities`` output is the softmax at ``temperature``, the
    network's ``label_smoothing`` taken off first (``calibration.rescale``)."""
    from onnx import helper, numpy_helper

    if temperature <= 0:
        raise CnnforgeError(f"temperature must be positive, not {temperature}")
    scaled = copy.deepcopy(proto)
    graph = scaled.graph
    for node in graph.node:
        node.output[:] = [UNCALIBRATED if name == OUTPUT_NAME else name for name in node.output]
        node.input[:] = [UNCALIBRATED if name == OUTPUT_NAME else name for name in node.input]
    graph.initializer.append(
        numpy_helper.from_array(np.array(temperature, np.float32), "cal_temperature")
    )
    graph.node.extend(
        [
            *_floored(graph, label_smoothing),
            helper.make_node("Log", ["cal_floored"], ["cal_log"]),
            helper.make_node("Div", ["cal_log", "cal_temperature"], ["cal_scaled"]),
            helper.make_node("Softmax", ["cal_scaled"], [OUTPUT_NAME], axis=1),
        ]
    )
    return scaled


def _floored(graph: Any, label_smoothing: float) -> list[Any]:
    """Nodes making ``cal_floored`` of the uncalibrated output: ``p`` floored at ``LOG_FLOOR``,
    or, for a label-smoothed network, ``p - ε / K`` floored at ``SMOOTHED_FLOOR`` of ``ε / K``
    (K read from the output's shape, so any graph's class count)."""
    from onnx import TensorProto, helper, numpy_helper

    if not label_smoothing:
        graph.initializer.append(
            numpy_helper.from_array(np.array(calibration.LOG_FLOOR, np.float32), "cal_floor")
        )
        return [helper.make_node("Max", [UNCALIBRATED, "cal_floor"], ["cal_floored"])]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(label_smoothing, np.float32), "cal_smoothing"),
            numpy_helper.from_array(np.array(1, np.int64), "cal_class_axis"),
            numpy_helper.from_array(
                np.array(calibration.SMOOTHED_FLOOR, np.float32), "cal_floor_part"
            ),
        ]
    )
    return [
        helper.make_node("Shape", [UNCALIBRATED], ["cal_shape"]),
        helper.make_node("Gather", ["cal_shape", "cal_class_axis"], ["cal_classes_int"]),
        helper.make_node("Cast", ["cal_classes_int"], ["cal_classes"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["cal_smoothing", "cal_classes"], ["cal_share"]),
        helper.make_node("Sub", [UNCALIBRATED, "cal_share"], ["cal_unsmoothed"]),
        helper.make_node("Mul", ["cal_share", "cal_floor_part"], ["cal_floor"]),
        helper.make_node("Max", ["cal_unsmoothed", "cal_floor"], ["cal_floored"]),
    ]


@dataclass
class HeldOut:
    """Images the exported model did not train on (NHWC) and their labels, what they are, and
    the labels of the images it trained on with a function returning those images by position
    (the bank of the score is drawn from them: only the bank's images are copied).
    ``probabilities``: a run saved before the calibration slice, whose held-out figures are a
    trial model's."""

    images: np.ndarray | None
    labels: np.ndarray
    source: str
    training_labels: np.ndarray | None = None
    training_images: Callable[[np.ndarray], np.ndarray] | None = None
    probabilities: np.ndarray | None = None


def rows_of(dataset: Dataset, indices: np.ndarray) -> np.ndarray:
    """Images of train+validation by index into their concatenation, in the order given,
    without concatenating them (a copy of the whole training data, for a large folder)."""
    first = len(dataset.y_train)
    rows = np.empty((len(indices), *dataset.x_train.shape[1:]), dataset.x_train.dtype)
    in_train = indices < first
    rows[in_train] = dataset.x_train[indices[in_train]]
    rows[~in_train] = dataset.x_val[indices[~in_train] - first]
    return rows


def heldout(source: ExportSource, dataset: Dataset | None) -> HeldOut:
    """The held-out images of the model being exported (the module says which)."""
    run = RunDir(source.run_dir) if source.run_dir else None
    if run is not None and source.keras_path == run.best_model and run.heldout.is_file():
        with np.load(run.heldout) as saved:
            if "indices" not in saved:  # saved before the calibration slice
                labels, source = saved["labels"], str(saved["source"])
                return HeldOut(None, labels, source, probabilities=saved["probabilities"])
            return _slice_of(dataset, saved["indices"], saved["labels"], str(saved["source"]))
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
    what = f"validation split of {dataset.spec.name}, predicted by the exported model"
    return HeldOut(
        dataset.x_val, dataset.y_val, what, dataset.y_train, lambda i: dataset.x_train[i]
    )


def _slice_of(
    dataset: Dataset | None, indices: np.ndarray, labels: np.ndarray, source: str
) -> HeldOut:
    """The recorded images of train+validation, checked against the data loaded now."""
    if dataset is None:
        raise CnnforgeError(f"calibrating needs the run's data ({source}); give --data")
    y = np.concatenate([dataset.y_train, dataset.y_val])
    if indices.size and (indices.max() >= len(y) or not np.array_equal(y[indices], labels)):
        raise CnnforgeError(
            f"the held-out images recorded in the run ({source}) are not in "
            f"{dataset.spec.name} as loaded now; export with the run's own data and seed"
        )
    trained = np.setdiff1d(np.arange(len(y)), indices)
    images = rows_of(dataset, indices)
    return HeldOut(images, labels, source, y[trained], lambda i: rows_of(dataset, trained[i]))


def _retrained(run: RunDir) -> bool:
    return run.search.is_file() and bool(run.read_json(run.search).get("final_training"))


def fit_in_graph(
    proto: Any,
    held: HeldOut,
    layout: str,
    provider: str,
    acceptance: float,
    label_smoothing: float = 0.0,
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``proto`` with its temperature and score in the graph; what the metadata records
    (``probability_calibration`` and ``unknown_threshold``), fitted on the graph's own outputs
    for the held-out images (or, for an older run, the trial's recorded probabilities); and the
    check of the graph's score against NumPy's on up to 256 of those images.
    ``label_smoothing``: the network's (``label_smoothing_of``), taken off before the
    temperature."""
    features = feature_tensor(proto)
    if held.probabilities is not None:
        probabilities, held_features, features = held.probabilities, None, None
    else:
        probe = open_session(with_features(proto, features).SerializeToString(), provider=provider)
        probabilities, *rest = _outputs(probe, held.images, layout, proto)
        held_features = rest[0] if features else None
    classes = probabilities.shape[1]
    if len(held.labels) == 0 or held.labels.max() >= classes:
        raise CnnforgeError(
            f"held-out labels ({held.source}) do not fit a model of {classes} classes"
        )
    fitted = calibration.calibrate(probabilities, held.labels, held.source, label_smoothing)
    scaled = with_temperature(proto, fitted.temperature, label_smoothing)
    unknown: dict[str, Any]
    check: dict[str, Any] = {}
    if held_features is None or held.training_labels is None:
        calibrated = calibration.rescale(probabilities, fitted.temperature, label_smoothing)
        scores = calibration.max_probability(calibrated)
        unknown = {"score": MAX_PROBABILITY, "output": OUTPUT_NAME}
    else:
        bank, k, described = _bank(probe, held, layout, proto)
        scaled = with_knn_score(scaled, features, bank, k)
        scores = calibration.knn_score(held_features, bank, k)
        unknown = {"score": KNN, "output": OOD_OUTPUT_NAME, "k": k, "bank": described}
        check = _check_score(scaled, held.images[:256], scores[:256], layout, provider)
    unknown |= {
        "threshold": calibration.acceptance_threshold(scores, acceptance),
        "acceptance": acceptance,
        "source": held.source,
    }
    fitted_metadata = {"probability_calibration": asdict(fitted), "unknown_threshold": unknown}
    return scaled, fitted_metadata, check


def label_smoothing_of(model: Any) -> float:
    """The label smoothing ``model`` was compiled to train with (its loss's), else 0: a model
    saved by Keras keeps its compiled loss."""
    smoothing = getattr(getattr(model, "loss", None), "label_smoothing", 0.0)
    return float(smoothing) if isinstance(smoothing, int | float) else 0.0


def _check_score(
    proto: Any, images: np.ndarray, expected: np.ndarray, layout: str, provider: str
) -> dict[str, Any]:
    """The graph's ``ood_score`` next to NumPy's (``expected``) on the same images."""
    session = open_session(proto.SerializeToString(), provider=provider)
    got = _outputs(session, images, layout, proto)[1]
    return {
        "ood_score_images": len(images),
        "ood_score_max_abs_diff": float(np.abs(got - expected).max()),
    }


def _outputs(session: Any, images: np.ndarray, layout: str, proto: Any) -> list[np.ndarray]:
    batch = prediction_batch_size(proto)
    return onnx_outputs(session, to_layout(images.astype(np.float32), layout), batch)


def _bank(probe: Any, held: HeldOut, layout: str, proto: Any) -> tuple[np.ndarray, int, str]:
    """Normalised features of a stratified, seeded sample of the training images (at most
    ``BANK_IMAGES`` and ``BANK_BYTES``), k, and the sample in words."""
    labels = held.training_labels
    width = int(probe.get_outputs()[1].shape[1])
    most = max(1, min(BANK_IMAGES, BANK_BYTES // (4 * width)))
    chosen = np.arange(len(labels))
    if len(labels) > most:
        chosen = np.sort(stratified_split(labels, most / len(labels), 0)[1])
    x = held.training_images(chosen)
    bank = calibration.normalised(_outputs(probe, x, layout, proto)[1]).astype(np.float32)
    k = max(1, min(len(bank), math.ceil(K_SHARE * len(bank))))
    return bank, k, f"{len(bank)} training images ({width} features each)"


def feature_tensor(proto: Any) -> str | None:
    """The input of the final Dense layer (the MatMul or Gemm whose output, through bias and
    casts, the softmax of ``probabilities`` takes), or None where the graph ends otherwise."""
    graph = proto.graph
    producers = {name: node for node in graph.node for name in node.output}
    constants = {i.name for i in graph.initializer}
    softmax = producers.get(OUTPUT_NAME)
    while softmax is not None and softmax.op_type in ("Cast", "Identity"):
        softmax = producers.get(softmax.input[0])  # a variant's output cast back to float32
    if softmax is None or softmax.op_type != "Softmax":
        return None
    node = producers.get(softmax.input[0])
    while node is not None and node.op_type in PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        return None
    name = node.input[0]
    while name in producers and producers[name].op_type in QUANTIZING:
        name = producers[name].input[0]  # the features before the variant's quantization
    return None if name in constants else name


def with_features(proto: Any, features: str | None) -> Any:
    """A copy of ``proto`` that also outputs ``features`` as float32 (``FEATURES``): the probe
    the score is fitted with."""
    from onnx import TensorProto, helper

    probe = copy.deepcopy(proto)
    if features is not None:
        probe.graph.node.append(helper.make_node("Cast", [features], [FEATURES], to=1))
        probe.graph.output.append(
            helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", None])
        )
    return probe


def with_knn_score(proto: Any, features: str, bank: np.ndarray, k: int) -> Any:
    """A copy of ``proto`` with a second output ``ood_score``: the cosine similarity of the
    ``features`` to their ``k``-th nearest row of ``bank`` (normalised, images × features), as
    :func:`cnnforge.core.calibration.knn_score` computes it. Only ops of opset 11 and later
    whose form has not changed since (no Reduce*: their axes moved to an input in opset 18)."""
    from onnx import TensorProto, helper, numpy_helper

    scored = copy.deepcopy(proto)
    graph = scored.graph
    width = bank.shape[1]
    graph.initializer.extend(
        [
            numpy_helper.from_array(bank.T.astype(np.float32), "ood_bank"),
            numpy_helper.from_array(np.ones((width, 1), np.float32), "ood_ones"),
            numpy_helper.from_array(np.array(calibration.NORM_EPSILON, np.float32), "ood_eps"),
            numpy_helper.from_array(np.array([k], np.int64), "ood_k"),
            numpy_helper.from_array(np.array(k - 1, np.int64), "ood_kth"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Cast", [features], ["ood_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["ood_f", "ood_f"], ["ood_f2"]),
            helper.make_node("MatMul", ["ood_f2", "ood_ones"], ["ood_len2"]),
            helper.make_node("Add", ["ood_len2", "ood_eps"], ["ood_len2e"]),
            helper.make_node("Sqrt", ["ood_len2e"], ["ood_len"]),
            helper.make_node("Div", ["ood_f", "ood_len"], ["ood_unit"]),
            helper.make_node("MatMul", ["ood_unit", "ood_bank"], ["ood_cos"]),
            helper.make_node("TopK", ["ood_cos", "ood_k"], ["ood_top", "ood_top_i"], axis=1),
            helper.make_node("Gather", ["ood_top", "ood_kth"], [OOD_OUTPUT_NAME], axis=1),
        ]
    )
    graph.output.append(
        helper.make_tensor_value_info(OOD_OUTPUT_NAME, TensorProto.FLOAT, ["batch"])
    )
    return scored


def check_argmax(
    uncalibrated: bytes, calibrated: bytes, images: np.ndarray, layout: str, provider: str
) -> dict[str, Any]:
    """The calibrated graph on ``images`` next to the uncalibrated one: the share of unchanged
    argmaxes (must be 1) and the largest difference from the temperature applied in NumPy."""
    batch = to_layout(images, layout)
    before = onnx_outputs(open_session(uncalibrated, provider=provider), batch, 64)[0]
    after = onnx_outputs(open_session(calibrated, provider=provider), batch, 64)[0]
    scalars = _scalars(calibrated)
    temperature = scalars.get("cal_temperature", 1.0)
    label_smoothing = scalars.get("cal_smoothing", 0.0)
    expected = calibration.rescale(before, temperature, label_smoothing)
    return {
        "temperature": temperature,
        "label_smoothing": label_smoothing,
        "images": len(images),
        "argmax_unchanged": float(np.mean(before.argmax(1) == after.argmax(1))),
        "max_abs_diff_from_numpy": float(np.abs(after - expected).max()),
    }


def _scalars(model: bytes) -> dict[str, float]:
    """The scalar initializers of ``model`` by name (the calibration's among them), read from
    one parse of it."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model).graph
    return {i.name: float(numpy_helper.to_array(i)) for i in graph.initializer if not i.dims}
