"""Dataset sources → a checked ``Dataset``: DataSpec plus train / validation / test arrays.

A data source is written ``NAME`` or ``NAME:PATH`` (``fashion_mnist:/usr/share/datasets/fashion-mnist``,
``dir:photos``, ``npz:data.npz``); a bare path to an ``.npz`` file or a folder works too. ``NAME``
is a dataset plugin; it returns ``RawData`` and this module checks it, adds the channel axis and
draws a stratified, seeded validation split from the training data.

Images stay raw (0–255, uint8 where the source allows): scaling lives inside the model, so the
exported model takes raw pixels.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge import registry
from cnnforge.core.errors import CnnforgeError
from cnnforge.core.preprocessing import Preprocessing

FINGERPRINT_SAMPLE = 256  # images per split hashed into a dataset's fingerprint


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its data."""

    name: str
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> DataSpec:
        """The spec as ``config.json`` records it (lists where the spec has tuples)."""
        return cls(saved["name"], tuple(saved["input_shape"]), tuple(saved["class_names"]))


@dataclass(frozen=True)
class RawData:
    """What a dataset plugin returns: images (N, H, W[, C]) with pixels in 0–255, int labels.

    ``x_val``/``y_val``: a validation split of the source's own (else one is drawn from the
    training data); ``preprocessing``: how files were turned into these arrays, where they were.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    preprocessing: Preprocessing | None = None


@dataclass(frozen=True)
class Dataset:
    spec: DataSpec
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    # How an image becomes one of these arrays' images: what deployment must do too.
    preprocessing: Preprocessing | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable files: path → why
    ignored: dict[str, int] = field(default_factory=dict)  # ignored files: why → count

    def record(self) -> dict[str, Any]:
        """What a run directory keeps of how its data was read (``data.json``)."""
        return {
            "source": self.spec.name,
            "preprocessing": self.preprocessing.to_json() if self.preprocessing else None,
            "images": {
                "train": len(self.x_train),
                "val": len(self.x_val),
                "test": len(self.x_test),
            },
            "skipped": self.skipped,
            "ignored": self.ignored,
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> dict[str, Any]:
        """What tells this data from other data, cheap to compute on any size: class names,
        input shape, split sizes, and a hash over every label and a fixed, evenly spaced sample
        of ``FINGERPRINT_SAMPLE`` images per split (an edit elsewhere may go unnoticed)."""
        digest = hashlib.sha256()
        splits = {
            "train": (self.x_train, self.y_train),
            "val": (self.x_val, self.y_val),
            "test": (self.x_test, self.y_test),
        }
        for x, y in splits.values():
            digest.update(np.asarray(y, dtype=np.int64).tobytes())
            count = min(FINGERPRINT_SAMPLE, len(x))
            for index in np.linspace(0, len(x) - 1, count, dtype=np.int64):
                digest.update(np.ascontiguousarray(x[index]).tobytes())
        return {
            "class_names": list(self.spec.class_names),
            "input_shape": list(self.spec.input_shape),
            "splits": {name: len(y) for name, (_, y) in splits.items()},
            "content": digest.hexdigest()[:16],
        }

    def class_weights(self) -> dict[int, float]:
        """Each class weighted inversely to its share of the training images (mean weight 1 per
        image): Keras' ``class_weight`` for imbalanced classes."""
        counts = np.bincount(self.y_train, minlength=self.spec.num_classes).astype(np.float64)
        total, classes = counts.sum(), self.spec.num_classes
        return {i: float(total / (classes * c)) if c else 0.0 for i, c in enumerate(counts)}


def parse_source(source: str) -> tuple[str, str | None]:
    """Split a data source into (dataset plugin name, path or None)."""
    name, sep, rest = source.partition(":")
    if sep and name.isidentifier():
        return name, rest or None
    path = Path(source).expanduser()
    if source.endswith(".npz"):
        return "npz", source
    if path.is_dir() or "/" in source:
        return "dir", source
    return source, None


def load_dataset(
    source: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    preprocessing: Preprocessing | None = None,
    strict: bool = False,
) -> Dataset:
    """Load ``source`` through its dataset plugin, check it, and split off validation data
    (unless the source has its own).

    ``preprocessing``: how images become the model's input (size, resize policy,
    interpolation; what it leaves open is chosen from the data). Plugins that read files take
    it (and ``strict``: unreadable files are an error, not skipped); images a plugin returns as
    arrays of another size are resized by it."""
    if not 0 < val_fraction < 1:
        raise CnnforgeError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    name, path = parse_source(source)
    plugin = registry.get("dataset", name)
    raw = plugin.fn(path, **_plugin_options(plugin.fn, preprocessing, strict, seed))
    if not isinstance(raw, RawData):
        raise CnnforgeError(
            f"dataset plugin {name!r} returned {type(raw).__name__}; it must return cnnforge.RawData"
        )
    x_train, y_train = _checked_split(source, "train", raw.x_train, raw.y_train, raw.class_names)
    x_test, y_test = _checked_split(source, "test", raw.x_test, raw.y_test, raw.class_names)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise CnnforgeError(
            f"dataset {source!r}: train images are {x_train.shape[1:]} but test images are "
            f"{x_test.shape[1:]}; make them the same size"
        )
    if raw.x_val is not None:
        x_val, y_val = _checked_split(source, "validation", raw.x_val, raw.y_val, raw.class_names)
    else:
        train_idx, val_idx = stratified_split(y_train, val_fraction, seed)
        x_train, y_train, x_val, y_val = (
            x_train[train_idx],
            y_train[train_idx],
            x_train[val_idx],
            y_train[val_idx],
        )
    used = raw.preprocessing
    if used is None:
        used = _array_preprocessing(x_train.shape[1:], preprocessing)
        x_train, x_val, x_test = (resize_arrays(x, used) for x in (x_train, x_val, x_test))
    spec = DataSpec(name=source, input_shape=x_train.shape[1:], class_names=tuple(raw.class_names))
    return Dataset(
        spec,
        x_train,
        y_train,
        x_val,
        y_val,
        x_test,
        y_test,
        preprocessing=used,
        skipped=dict(getattr(raw, "skipped", {})),
        ignored=dict(getattr(raw, "ignored", {})),
    )


def _plugin_options(fn: Any, preprocessing: Preprocessing | None, strict: bool, seed: int) -> dict:
    """The keyword options a dataset plugin's function accepts, of those load_dataset has."""
    try:
        accepted = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    options = {"preprocessing": preprocessing, "strict": strict, "seed": seed}
    return {k: v for k, v in options.items() if k in accepted}


def _array_preprocessing(shape: tuple[int, ...], requested: Preprocessing | None) -> Preprocessing:
    """The preprocessing of array data of (H, W, C) ``shape``: its own size and channels
    unless ``requested`` sets them."""
    own = Preprocessing.for_shape(shape)
    if requested is None:
        return own
    return Preprocessing(
        size=requested.size or own.size,
        policy=requested.policy,
        interpolation=requested.interpolation,
        color_mode=requested.color_mode or own.color_mode,
    )


def resize_arrays(x: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """(N, H, W, C) raw images at ``preprocessing``'s size and channels (``x`` itself where
    they are already)."""
    if x.shape[1:] == (*preprocessing.size, preprocessing.channels):
        return x
    from PIL import Image

    out = np.empty((len(x), *preprocessing.size, preprocessing.channels), dtype=np.uint8)
    for i, image in enumerate(np.clip(x, 0, 255).astype(np.uint8)):
        out[i] = preprocessing.apply(
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        )
    return out


def as_dataset(
    data: str | Dataset,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    preprocessing: Preprocessing | None = None,
) -> Dataset:
    """``data`` itself when it is loaded already (one ``cnnforge run`` loads its data once and
    hands it to every stage), else the source it names, loaded (by ``preprocessing``)."""
    if isinstance(data, Dataset):
        return data
    return load_dataset(data, val_fraction=val_fraction, seed=seed, preprocessing=preprocessing)


def _checked_split(source, split, x, y, class_names) -> tuple[np.ndarray, np.ndarray]:
    # image files streamed from disk (cnnforge.data.stream) stay files: asarray would decode them
    x = x if hasattr(x, "tf_dataset") else np.asarray(x)
    y = np.asarray(y).reshape(-1)
    where = f"dataset {source!r} ({split} split)"
    if len(x) == 0:
        raise CnnforgeError(f"{where} has no images; check the path or folder")
    if len(x) != len(y):
        raise CnnforgeError(f"{where} has {len(x)} images but {len(y)} labels; they must match")
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise CnnforgeError(
            f"{where}: images have shape {x.shape[1:]}; expected (H, W) or (H, W, 1|3|4)"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise CnnforgeError(f"{where}: labels must be integers, got {y.dtype}")
    if len(class_names) < 2:
        raise CnnforgeError(f"{where} has {len(class_names)} class; a classifier needs at least 2")
    if y.min() < 0 or y.max() >= len(class_names):
        raise CnnforgeError(
            f"{where}: labels range over {y.min()}..{y.max()} but there are {len(class_names)} "
            f"classes; labels must be 0..{len(class_names) - 1}"
        )
    return x, y.astype(np.int64)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) index arrays holding out ``fraction`` of every class."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        held.append(members[: max(1, round(fraction * len(members)))] if len(members) > 1 else [])
    held_out = np.sort(np.concatenate(held).astype(np.int64))
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return rng.permutation(keep), rng.permutation(held_out)


# The share of train+validation a final training leaves out for calibration, and its cap.
CALIBRATION_FRACTION = 0.1
CALIBRATION_MOST = 5000


def calibration_slice(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified (kept, held-out) indices of train+validation: the final model does
    not train on the held-out ones, so its temperature and its "not one of the classes"
    threshold are fitted on its own predictions of images it has not seen. The model the run
    exports is this one: a trial's model, trained on less, calibrates it less well (its
    temperature was 1.015 where the final model's test split wanted 1.196; fitted on the slice,
    1.822 where it wanted 1.882: docs/calibration.md)."""
    fraction = min(CALIBRATION_FRACTION, CALIBRATION_MOST / max(1, len(labels)))
    return stratified_split(labels, fraction, seed)


def final_training_examples(dataset: Dataset, seed: int) -> int:
    """How many images a final training trains on: train+validation less its calibration
    slice (what its time is reserved for)."""
    labels = np.concatenate([dataset.y_train, dataset.y_val])
    return len(calibration_slice(labels, seed)[0])


# --- readers for common formats --------------------------------------------------------------
