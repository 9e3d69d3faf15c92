"""Accuracy of the deployed model: onnxruntime on the test split, per-class precision/recall,
and how far its probabilities can be trusted (ECE, NLL, Brier, selective accuracy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core import calibration
from cnnforge.core.errors import CnnforgeError
from cnnforge.core.preprocessing import IMAGE_MODES, Preprocessing, pixel_range_of, scale
from cnnforge.data.dataset import Dataset, as_dataset
from cnnforge.deploy.onnxinfo import image_input
from cnnforge.deploy.runtime import (
    metadata,
    open_session,
    predict,
    prediction_batch_size,
    to_layout,
)


@dataclass
class ClassScore:
    name: str
    precision: float
    recall: float
    support: int


@dataclass
class Evaluation:
    model: str
    data: str
    images: int
    accuracy: float
    per_class: list[ClassScore]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    ece: float  # expected calibration error, 15 equal-width bins
    nll: float  # mean negative log-likelihood of the true class
    brier: float  # mean squared distance to the one-hot true class (0 to 2)
    # accuracy on the most confident share of the images: {"100%": ..., "90%": ..., "80%": ...}
    selective_accuracy: dict[str, float]


COVERAGES = (1.0, 0.9, 0.8)


def selective_accuracies(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy at each of ``COVERAGES``, keyed by the coverage in per cent."""
    return {
        f"{coverage:.0%}": calibration.selective_accuracy(probabilities, labels, coverage)
        for coverage in COVERAGES
    }


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def class_scores(matrix: np.ndarray, names: tuple[str, ...]) -> list[ClassScore]:
    """Precision and recall per class from a confusion matrix (0 where undefined)."""
    true_pos = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    return [
        ClassScore(names[i], float(precision[i]), float(recall[i]), int(actual[i]))
        for i in range(len(names))
    ]


def predict_images(
    onnx_path: Path | str,
    images: np.ndarray,
    *,
    batch_size: int | None = None,
    session: Any | None = None,
    source: str = "the input",
) -> np.ndarray:
    """(images × classes) probabilities of the ONNX model for ``images``: raw pixels, NHWC (as
    datasets hold them), handed to the model in its own input layout (NHWC or NCHW, from its
    ``cnnforge.input_layout`` metadata, else its input shape), scaled to its
    ``cnnforge.pixel_range``, ``batch_size`` at a time (None: as many as fit the memory budget of
    :func:`cnnforge.deploy.runtime.prediction_batch_size`).

    Every stage that runs the exported model on a dataset's images uses this (``evaluate``, the
    report's test-split figures). ``session``: an open session on ``onnx_path`` to reuse;
    ``source``: what the images are, for the error when they do not fit the model.
    """
    image = image_input(onnx_path)
    if image.nhwc_shape != images.shape[1:]:
        raise CnnforgeError(
            f"model {onnx_path} takes images of shape {image.shape} ({image.layout}); {source} has "
            f"images of shape {images.shape[1:]} (NHWC); give it the data it was trained for"
        )
    session = session if session is not None else open_session(onnx_path)
    low, high = pixel_range_of(metadata(session))
    if (low, high) != (0, 255):  # the model takes other than raw pixels: as predict scales them
        images = scale(images, (low, high))  # (raw ones are made float32 a batch at a time)
    batch_size = batch_size or prediction_batch_size(onnx_path)
    return predict(session, to_layout(images, image.layout), batch_size)


def source_preprocessing(onnx_path: Path | str, session: Any) -> Preprocessing | None:
    """How a data source is read for the model, as ``predict`` reads a file for it
    (:meth:`Preprocessing.of_model`): its recorded preprocessing, else stretched to its input
    shape. None for an input that is not an image file's (say 6 channels): arrays as they are."""
    shape = image_input(onnx_path).nhwc_shape
    if shape[-1] not in IMAGE_MODES:
        return None
    return Preprocessing.of_model(metadata(session), shape, model=str(onnx_path))


def evaluate(model_path: Path | str, data: str | Dataset) -> Evaluation:
    """Score the ONNX model on the test split of ``data`` (a source, or a dataset already
    loaded) with onnxruntime, in the model's own input layout (NHWC or NCHW, from its metadata
    or its graph: :func:`predict_images`)."""
    session = open_session(model_path)
    dataset = as_dataset(data, preprocessing=source_preprocessing(model_path, session))
    data = dataset.spec.name
    probabilities = predict_images(model_path, dataset.x_test, session=session, source=data)
    outputs = probabilities.shape[1]
    if outputs != dataset.spec.num_classes:
        raise CnnforgeError(
            f"model {model_path} predicts {outputs} classes but {data} has {dataset.spec.num_classes}"
        )
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(dataset.y_test, predicted, outputs)
    names = tuple(metadata(session).get("class_names") or dataset.spec.class_names)
    return Evaluation(
        str(model_path),
        data,
        len(predicted),
        float(np.mean(predicted == dataset.y_test)),
        class_scores(matrix, names),
        matrix.tolist(),
        calibration.ece(probabilities, dataset.y_test),
        calibration.nll(probabilities, dataset.y_test),
        calibration.brier(probabilities, dataset.y_test),
        selective_accuracies(probabilities, dataset.y_test),
    )
