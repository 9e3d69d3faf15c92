"""Label images with an exported model: the deployment API.

It needs onnxruntime, numpy and Pillow, nothing else: no TensorFlow, no Keras, not even the
``onnx`` package, so it runs wherever the model is deployed. Everything it must know comes from
the model's ``cnnforge.*`` metadata (class names, input layout, pixel range, preprocessing); a
model without
it is used as its graph says (layout guessed from the shape, pixels 0–255, class indices as
labels), with a warning.

    from cnnforge.deploy.predict import Classifier

    classifier = Classifier("model.onnx")
    for prediction in classifier.predict(["boot.png", "shirt.jpg"], top_k=3):
        print(prediction.image, prediction.top)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.contract import OOD_OUTPUT_NAME, OUTPUT_NAME
from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.core.preprocessing import IMAGE_MODES, Preprocessing, pixel_range_of, scale
from cnnforge.deploy.images import fit_image, load_image
from cnnforge.deploy.onnxinfo import layout_from_shape
from cnnforge.deploy.quantize import warn_if_slow
from cnnforge.deploy.runtime import metadata, open_session, predict_outputs, to_layout

ImageLike = Any  # a path (str or Path), a uint8 array (H, W[, C]) or a PIL image
# The label of an image whose top probability is below the confidence asked for.
UNKNOWN = "unknown"
MAX_PROBABILITY = "max_probability"


@dataclass(frozen=True)
class UnknownRule:
    """Answer ``unknown`` where ``score`` is below ``threshold``: the top probability
    (``output`` is the probabilities), or a score the graph outputs (``ood_score``)."""

    score: str
    threshold: float
    output: str = OUTPUT_NAME

    @property
    def on_top_probability(self) -> bool:
        return self.output == OUTPUT_NAME


@dataclass(frozen=True)
class Rows:
    """A batch's probabilities (images × classes) and, where the graph has one, its score of
    each image (``ood_score``); sliced together (the server's batcher splits a batch by
    request)."""

    probabilities: np.ndarray
    scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, part: slice) -> Rows:
        scores = None if self.scores is None else self.scores[part]
        return Rows(self.probabilities[part], scores)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """As an array: the probabilities, for code that reads only those (``np.asarray``)."""
        return np.asarray(self.probabilities, dtype=dtype)


@dataclass(frozen=True)
class Prediction:
    """The ``top_k`` labels of one image, most probable first."""

    image: str
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    # The least top probability accepted (None: every image gets its top label), and whether
    # this image fell below it ("not one of the classes").
    min_confidence: float | None = None
    unknown: bool = False
    # Where a rule decides "unknown": its score's name, this image's value, the threshold.
    score: str | None = None
    score_value: float | None = None
    threshold: float | None = None

    @property
    def top(self) -> list[tuple[str, float]]:
        return list(zip(self.labels, self.probabilities, strict=True))

    @property
    def label(self) -> str:
        """The answer: the top label, or ``unknown`` below the confidence asked for."""
        return UNKNOWN if self.unknown else self.labels[0]

    def as_dict(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"image": self.image}
        if self.score is not None:
            answer |= {"label": self.label, "unknown": self.unknown}
            if self.min_confidence is not None:
                answer["min_confidence"] = self.min_confidence
            answer |= {
                "score": self.score,
                "score_value": self.score_value,
                "threshold": self.threshold,
            }
        return answer | {"top": [{"label": label, "probability": p} for label, p in self.top]}


def unknown_rule(
    recorded: Any,
    model: str,
    reject_unknown: bool,
    min_confidence: float | None,
    outputs: Sequence[str],
) -> UnknownRule | None:
    """When an image is "not one of the classes": below ``min_confidence`` of top probability
    where given, else, with ``reject_unknown``, below the threshold of the score recorded at
    export (``recorded``: the model's ``cnnforge.unknown_threshold``; its ``output`` one of the
    graph's ``outputs``), else never (None)."""
    if min_confidence is not None:
        if not 0 <= min_confidence <= 1:
            raise CnnforgeError(f"min_confidence must be between 0 and 1, got {min_confidence}")
        return UnknownRule(MAX_PROBABILITY, float(min_confidence))
    if not reject_unknown:
        return None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("threshold"), (int, float)):
        raise CnnforgeError(
            f"{model} records no threshold for 'unknown' (cnnforge.unknown_threshold); export "
            "it with --calibrate, or give --min-confidence P"
        )
    output = str(recorded.get("output", OUTPUT_NAME))
    if output not in outputs:
        raise CnnforgeError(
            f"{model} records its 'unknown' threshold on the output {output!r}, which its graph "
            f"lacks ({', '.join(outputs)}); export it again with --calibrate"
        )
    score = str(recorded.get("score", MAX_PROBABILITY))
    return UnknownRule(score, float(recorded["threshold"]), output)


class Classifier:
    """An exported cnnforge model, ready to label images."""

    def __init__(
        self,
        model: Path | str,
        *,
        provider: str = "cpu",
        threads: int | None = None,
        reject_unknown: bool = False,
        min_confidence: float | None = None,
        spinning: bool | None = None,
    ) -> None:
        """``reject_unknown``: answer ``unknown`` below the threshold of the score the model
        records (``cnnforge export --calibrate``: its ``ood_score`` output, or the top
        probability); ``min_confidence``: below this top probability instead. ``spinning``:
        whether onnxruntime's threads spin between calls (see
        :func:`cnnforge.deploy.runtime.open_session`)."""
        self.model = str(model)
        self.session = open_session(model, provider=provider, threads=threads, spinning=spinning)
        self.metadata = metadata(self.session)
        outputs = [o.name for o in self.session.get_outputs()]
        self.unknown_rule = rule = unknown_rule(
            self.metadata.get("unknown_threshold"),
            self.model,
            reject_unknown,
            min_confidence,
            outputs,
        )
        # the graph's score, answered beside the probabilities (fetching it costs nothing:
        # onnxruntime computes the whole graph either way): the one the rule reads, if any
        self.score_output: str | None = (
            rule.output
            if rule is not None and not rule.on_top_probability
            else (OOD_OUTPUT_NAME if OOD_OUTPUT_NAME in outputs else None)
        )
        graph_input = self.session.get_inputs()[0]
        per_image = graph_input.shape[1:]
        if len(graph_input.shape) != 4 or not all(isinstance(d, int) for d in per_image):
            raise CnnforgeError(
                f"{model} takes {graph_input.name!r} of shape {graph_input.shape}; cnnforge "
                "predict needs a 4-D image input with fixed height, width and channels"
            )
        self.layout: str = self.metadata.get("input_layout") or layout_from_shape(per_image)
        self.height, self.width, self.channels = (
            per_image if self.layout == "NHWC" else (*per_image[1:], per_image[0])
        )
        if self.channels not in IMAGE_MODES:
            raise CnnforgeError(
                f"{model} takes {self.channels}-channel images; cnnforge predict reads 1 "
                "(grayscale), 3 (RGB) or 4 (RGBA)"
            )
        batch = graph_input.shape[0]
        # a graph exported with a fixed batch size takes exactly that many images per call
        self.fixed_batch: int | None = batch if isinstance(batch, int) and batch > 0 else None
        self.pixel_range = pixel_range_of(self.metadata)
        self.preprocessing = Preprocessing.of_model(
            self.metadata, (self.height, self.width, self.channels), model=str(model)
        )
        self.precision = self.metadata.get("precision")
        names = self.metadata.get("class_names")
        classes = self.session.get_outputs()[0].shape[-1]
        if names is None and isinstance(classes, int):
            names = [str(i) for i in range(classes)]
        self.class_names: tuple[str, ...] | None = tuple(names) if names else None
        self._warn_if_metadata_missing()
        if self.precision:
            warn_if_slow(self.precision, provider)

    @property
    def min_confidence(self) -> float | None:
        """The least top probability answered, where the rule is on the top probability."""
        rule = self.unknown_rule
        return rule.threshold if rule is not None and rule.on_top_probability else None

    def _warn_if_metadata_missing(self) -> None:
        missing = [
            k for k in ("class_names", "input_layout", "pixel_range") if k not in self.metadata
        ]
        if missing:
            warnings.warn(
                f"{self.model} has no cnnforge metadata ({', '.join(missing)}); using what the "
                f"graph says: {self.layout} input {self.height}×{self.width}×{self.channels}, "
                f"pixels {self.pixel_range[0]}–{self.pixel_range[1]}"
                + (", class indices as labels" if "class_names" in missing else ""),
                CnnforgeWarning,
                stacklevel=3,
            )

    def pixels(self, image: ImageLike) -> np.ndarray:
        """One image as the model's (H, W, C) float32 pixels, by the model's preprocessing (its
        ``cnnforge.preprocessing`` metadata: the one its training data was read with):
        decoded and turned upright (a file, by :func:`cnnforge.deploy.images.load_image`, as
        ``explain`` reads it), converted to its colour mode, resized by its policy and
        interpolation, and scaled to its pixel range."""
        from PIL import Image

        if isinstance(image, (str, Path)):
            array = load_image(image, self.preprocessing).pixels
        else:
            if isinstance(image, np.ndarray):
                if image.dtype != np.uint8 or image.ndim not in (2, 3):
                    raise CnnforgeError(
                        f"an image array must be uint8 (H, W) or (H, W, C), got {image.dtype} "
                        f"{image.shape}"
                    )
                image = Image.fromarray(
                    image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
                )
            array = fit_image(image, self.preprocessing).pixels
        return scale(array, self.pixel_range)

    def batch(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """(H, W, C) pixels of :meth:`pixels` stacked into one batch in the model's layout."""
        return to_layout(np.stack(pixels), self.layout)

    def probabilities(self, images: Sequence[ImageLike]) -> np.ndarray:
        """(images × classes) probabilities; every image is decoded before any is run."""
        if not len(images):
            raise CnnforgeError("no images given; pass one or more image files")
        return self.run(self.batch([self.pixels(image) for image in images]))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities of a batch of :meth:`batch`."""
        return self.rows(batch).probabilities

    def rows(self, batch: np.ndarray) -> Rows:
        """Probabilities of a batch of :meth:`batch`, and the graph's score (``ood_score``, or
        the one the unknown rule reads) where it has one; a model with a fixed batch size gets
        it in chunks of exactly that size, the last padded with zeros and the padding's rows
        dropped."""
        names = [OUTPUT_NAME, self.score_output] if self.score_output else [OUTPUT_NAME]
        size, chunk = len(batch), self.fixed_batch
        if chunk:
            padding = np.zeros(((-size) % chunk, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, padding])
        outputs = predict_outputs(self.session, batch, names, batch_size=chunk or None)
        return Rows(*(o[:size] for o in outputs))

    def top(self, names: Sequence[str], rows: Rows | np.ndarray, top_k: int) -> list[Prediction]:
        """The ``top_k`` most probable labels of each row of probabilities (``names``: the
        images'); ties keep the class order, and ``top_k`` past the classes gives them all.
        Below the unknown rule's threshold a prediction is ``unknown`` (its labels stay)."""
        if top_k < 1:
            raise CnnforgeError(f"top_k must be at least 1, got {top_k}")
        if not isinstance(rows, Rows):
            rows = Rows(rows)
        probabilities, rule = rows.probabilities, self.unknown_rule
        if rule is not None and not rule.on_top_probability and rows.scores is None:
            raise CnnforgeError(f"the rows carry no {rule.output!r}: use Classifier.rows")
        classes = self.class_names or tuple(str(i) for i in range(probabilities.shape[1]))
        k = min(top_k, probabilities.shape[1])
        results = []
        for i, (name, row) in enumerate(zip(names, probabilities, strict=True)):
            best = np.argsort(-row, kind="stable")[:k]
            labels, top = tuple(classes[j] for j in best), tuple(float(row[j]) for j in best)
            if rule is None:
                results.append(Prediction(name, labels, top))
                continue
            value = top[0] if rule.on_top_probability else float(rows.scores[i])
            results.append(
                Prediction(
                    name,
                    labels,
                    top,
                    self.min_confidence,
                    value < rule.threshold,
                    rule.score,
                    value,
                    rule.threshold,
                )
            )
        return results

    def predict(self, images: Sequence[ImageLike], top_k: int = 5) -> list[Prediction]:
        """The ``top_k`` most probable labels of each image."""
        if top_k < 1:
            raise CnnforgeError(f"top_k must be at least 1, got {top_k}")
        if not len(images):
            raise CnnforgeError("no images given; pass one or more image files")
        rows = self.rows(self.batch([self.pixels(image) for image in images]))
        return self.top([_describe(image) for image in images], rows, top_k)


def _describe(image: ImageLike) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return getattr(image, "filename", "") or f"<{type(image).__name__}>"


def classify(
    model: Path | str, images: Sequence[ImageLike], *, top_k: int = 5, provider: str = "cpu"
) -> list[Prediction]:
    """``Classifier(model).predict(images, top_k)`` in one call."""
    return Classifier(model, provider=provider).predict(images, top_k)
