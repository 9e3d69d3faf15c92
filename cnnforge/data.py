"""Dataset sources → a checked ``Dataset``: DataSpec plus train / validation / test arrays.

A data source is written ``NAME`` or ``NAME:PATH`` (``fashion_mnist:/usr/share/datasets/fashion-mnist``,
``dir:photos``, ``npz:data.npz``); a bare path to an ``.npz`` file or a folder works too. ``NAME``
is a dataset plugin; it returns ``RawData`` and this module checks it, adds the channel axis and
draws a stratified, seeded validation split from the training data.

Images stay raw (0–255, uint8 where the source allows): scaling lives inside the model, so the
exported model takes raw pixels.

The readers for common on-disk formats (idx, CIFAR python pickles, image folders, npz) are public
so that dataset plugins can use them.
"""

from __future__ import annotations

import gzip
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnforge import registry
from cnnforge.errors import CnnforgeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its data."""

    name: str
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


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


def _open_maybe_gzip(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (the MNIST format), gzipped or not."""
    with _open_maybe_gzip(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CnnforgeError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise CnnforgeError(f"{path} is truncated: expected {np.prod(shape)} values")
    return payload.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise CnnforgeError(f"{folder} has no {stem}[.gz]; point to a folder with the four idx files")


def read_idx_folder(
    folder: Path,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Read the four MNIST-style idx files (``train-images-idx3-ubyte[.gz]`` …) of ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CnnforgeError(f"{folder} is not a folder; point to the folder with the idx files")
    return tuple(  # type: ignore[return-value]
        (
            read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte")),
            read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte")),
        )
        for prefix in ("train", "t10k")
    )


def read_cifar(path: Path, *, fine: bool = True) -> tuple[tuple, tuple, list[str]]:
    """Read a CIFAR-10/100 python version: the ``.tar.gz`` as downloaded or its extracted folder.

    Returns ((x_train, y_train), (x_test, y_test), class_names), images NHWC uint8.
    """
    path = Path(path)
    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            blobs = {name: tar.extractfile(m).read() for name, m in members.items()}  # type: ignore[union-attr]
    elif path.is_dir():
        blobs = {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    else:
        raise CnnforgeError(f"{path} is neither a CIFAR tarball nor its extracted folder")
    load = lambda name: pickle.loads(blobs[name], encoding="latin1")  # noqa: E731
    if "data_batch_1" in blobs:  # CIFAR-10
        train = [load(f"data_batch_{i}") for i in range(1, 6)]
        test, meta, key = load("test_batch"), load("batches.meta"), "labels"
        names = meta["label_names"]
        x_train = np.concatenate([b["data"] for b in train])
        y_train = np.concatenate([b[key] for b in train])
    elif "train" in blobs:  # CIFAR-100
        key = "fine_labels" if fine else "coarse_labels"
        train, test, meta = load("train"), load("test"), load("meta")
        names = meta["fine_label_names" if fine else "coarse_label_names"]
        x_train, y_train = train["data"], np.asarray(train[key])
    else:
        raise CnnforgeError(f"{path} does not hold CIFAR python batches (data_batch_1 or train)")
    to_nhwc = lambda x: np.asarray(x, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # noqa: E731
    return (
        (to_nhwc(x_train), np.asarray(y_train)),
        (to_nhwc(test["data"]), np.asarray(test[key])),
        list(names),
    )


def read_npz(path: Path) -> RawData:
    """Read ``x_train, y_train, x_test, y_test`` (and optional ``class_names``) from an .npz."""
    path = Path(path)
    if not path.is_file():
        raise CnnforgeError(f"{path} does not exist; give the path of an .npz file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:
        raise CnnforgeError(f"{path} is not a readable .npz file ({exc})") from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - arrays.keys()
    if missing:
        raise CnnforgeError(f"{path} lacks {', '.join(sorted(missing))}; save all four arrays")
    if "class_names" in arrays:
        names = tuple(str(n) for n in arrays["class_names"])
    else:
        top = max(int(arrays["y_train"].max(initial=0)), int(arrays["y_test"].max(initial=0)))
        names = tuple(str(i) for i in range(top + 1))
    return RawData(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], names)


def read_image_folder(folder: Path, *, test_fraction: float = 0.2, seed: int = 0) -> RawData:
    """Read ``folder/CLASS/*.png`` (or ``folder/train/CLASS`` and ``folder/test/CLASS``).

    Every image must have the same size; grayscale stays one channel unless some are in colour.
    Without ``train``/``test`` subfolders, a stratified seeded ``test_fraction`` is held out.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CnnforgeError(f"image folder {folder} does not exist; give a folder of class folders")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        names = _class_folders(folder / "train")
        x_train, y_train = _read_classes(folder / "train", names)
        x_test, y_test = _read_classes(folder / "test", names)
        return RawData(x_train, y_train, x_test, y_test, tuple(names))
    names = _class_folders(folder)
    x, y = _read_classes(folder, names)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    return RawData(x[train_idx], y[train_idx], x[test_idx], y[test_idx], tuple(names))


def _class_folders(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise CnnforgeError(
            f"image folder {folder} has {len(names)} class folder(s); put each class's images "
            "in its own subfolder, at least two classes"
        )
    return names


def _read_classes(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    files = [
        (path, label)
        for label, name in enumerate(names)
        for path in sorted((folder / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise CnnforgeError(
            f"image folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    images, first = [], None
    for path, _ in files:
        try:
            with Image.open(path) as img:
                img.load()
                images.append(img.copy())
        except (UnidentifiedImageError, OSError) as exc:
            raise CnnforgeError(f"cannot read image {path} ({exc}); remove or replace it") from None
        first = first or (path, images[-1].size)
        if images[-1].size != first[1]:
            raise CnnforgeError(
                f"images of mixed sizes: {first[0]} is {first[1][0]}x{first[1][1]} but {path} is "
                f"{images[-1].size[0]}x{images[-1].size[1]}; resize them to one size"
            )
    mode = "L" if all(img.mode in ("L", "1", "I;16") for img in images) else "RGB"
    x = np.stack([np.asarray(img.convert(mode), dtype=np.uint8) for img in images])
    return x, np.array([label for _, label in files], dtype=np.int64)
