"""Dataset sources → a checked ``Dataset``: DataSpec plus train / validation / test arrays.

A data source is written ``NAME`` or ``NAME:PATH`` (``fashion_mnist:/usr/share/datasets/fashion-mnist``,
``dir:photos``, ``npz:data.npz``); a bare path to an ``.npz`` file or a folder works too. ``NAME``
is a dataset plugin; it returns ``RawData`` and this module checks it, adds the channel axis and
draws a stratified, seeded validation split from the training data.

Images stay raw (0–255, uint8 where the source allows): scaling lives inside the model, so the
exported model takes raw pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge import registry
from cnnforge.core.errors import CnnforgeError


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
    """What a dataset plugin returns: images (N, H, W[, C]) with pixels in 0–255, int labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class Dataset:
    spec: DataSpec
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


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


def load_dataset(source: str, *, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Load ``source`` through its dataset plugin, check it, and split off validation data."""
    if not 0 < val_fraction < 1:
        raise CnnforgeError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    name, path = parse_source(source)
    plugin = registry.get("dataset", name)
    raw = plugin.fn(path)
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
    train_idx, val_idx = stratified_split(y_train, val_fraction, seed)
    spec = DataSpec(name=source, input_shape=x_train.shape[1:], class_names=tuple(raw.class_names))
    return Dataset(
        spec,
        x_train[train_idx],
        y_train[train_idx],
        x_train[val_idx],
        y_train[val_idx],
        x_test,
        y_test,
    )


def as_dataset(data: str | Dataset, *, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """``data`` itself when it is loaded already (one ``cnnforge run`` loads its data once and
    hands it to every stage), else the source it names, loaded."""
    if isinstance(data, Dataset):
        return data
    return load_dataset(data, val_fraction=val_fraction, seed=seed)


def _checked_split(source, split, x, y, class_names) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y).reshape(-1)
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


# --- readers for common formats --------------------------------------------------------------
