"""Readers for common on-disk image formats (idx, CIFAR python pickles, npz; image folders:
``cnnforge.data.folders``).

Public so that dataset plugins, the built-in ones included, can use them; each returns arrays
with raw 0-255 pixels and integer labels.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.errors import CnnforgeError
from cnnforge.data.dataset import RawData


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


# What a CIFAR python batch is made of besides dicts, lists, strings, bytes and ints (which
# pickle builds without naming a global): numpy arrays and numpy scalars, pickled by numpy 1
# (``numpy.core``, the real CIFAR files) or numpy 2 (``numpy._core``), with protocol 2 to 4
# (``_reconstruct``) or 5 (``_frombuffer``); and bytes pickled with protocol 2 by Python 3
# (``_codecs.encode``). Nothing else: a global outside this list could run code.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    *(
        (f"numpy.{core}.{module}", name)
        for core in ("core", "_core")
        for module, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    ),
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR batch holds (``_CIFAR_GLOBALS``) and refuses
    every other global, so a hostile pickle cannot run code while it is read."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        if module.startswith("numpy."):
            return getattr(_numpy_module(module.split(".")[-1]), name)
        return super().find_class(module, name)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _numpy_module(name: str) -> Any:
    """numpy's ``multiarray`` or ``numeric`` module under the name this numpy gives it
    (``numpy.core`` is a deprecated alias in numpy 2; numpy 1.26 has ``numpy._core`` shims)."""
    import importlib

    order = ("_core", "core") if int(np.__version__.split(".")[0]) >= 2 else ("core", "_core")
    for core in order:
        try:
            return importlib.import_module(f"numpy.{core}.{name}")
        except ImportError:
            continue
    raise ImportError(f"numpy has no {name} module")


def _unpickle_cifar(blobs: dict[str, bytes], name: str, source: Path) -> Any:
    """One CIFAR batch (Python 2 strings decoded as latin-1), read with ``_CifarUnpickler``."""
    if name not in blobs:
        raise CnnforgeError(f"{source} has no {name}; give the complete CIFAR python download")
    try:
        return _CifarUnpickler(io.BytesIO(blobs[name]), encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise CnnforgeError(
            f"{source}: {name} is a pickle that calls {exc}, which a CIFAR batch never does; "
            "refused to load it (use the python version from the CIFAR website)"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CnnforgeError(
            f"{source}: {name} is not a readable CIFAR batch ({reason}); download it again"
        ) from None


_CIFAR10_FILES = ("batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6)))
_CIFAR100_FILES = ("meta", "train", "test")


def _cifar_files(names: set[str]) -> tuple[str, ...]:
    """The batch files a CIFAR download with these file names holds (CIFAR-10's when it has
    ``data_batch_1``, else CIFAR-100's)."""
    return _CIFAR10_FILES if "data_batch_1" in names else _CIFAR100_FILES


def _cifar_blobs(path: Path) -> dict[str, bytes]:
    """The bytes of the CIFAR batch files only (other members, however big, are not read):
    in a tarball, looked up by name among its members; in a folder, in it or in one of its
    subfolders (the download's ``cifar-10-batches-py/``)."""
    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            members: dict[str, tarfile.TarInfo] = {}
            for member in tar.getmembers():  # headers only
                if member.isfile():
                    members.setdefault(Path(member.name).name, member)
            wanted = [n for n in _cifar_files(set(members)) if n in members]
            return {n: tar.extractfile(members[n]).read() for n in wanted}  # type: ignore[union-attr]
    if path.is_dir():
        for folder in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
            present = {n for n in ("data_batch_1", "train") if (folder / n).is_file()}
            if present:
                files = [folder / n for n in _cifar_files(present)]
                return {f.name: f.read_bytes() for f in files if f.is_file()}
        return {}
    raise CnnforgeError(f"{path} is neither a CIFAR tarball nor its extracted folder")


def read_cifar(path: Path, *, fine: bool = True) -> tuple[tuple, tuple, list[str]]:
    """Read a CIFAR-10/100 python version: the ``.tar.gz`` as downloaded or its extracted folder.

    Returns ((x_train, y_train), (x_test, y_test), class_names), images NHWC uint8.
    """
    path = Path(path)
    blobs = _cifar_blobs(path)
    load = lambda name: _unpickle_cifar(blobs, name, path)  # noqa: E731
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
        names = _names_from_labels(path, arrays["y_train"], arrays["y_test"])
    return RawData(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], names)


def _names_from_labels(path: Path, *labels: np.ndarray) -> tuple[str, ...]:
    """Class names "0".."N-1" for integer labels that have no names; labels outside 0..N-1
    (negative ones) are named as the problem, not counted as classes."""
    values = np.concatenate([np.asarray(y).reshape(-1) for y in labels])
    if values.size and np.issubdtype(values.dtype, np.integer) and values.min() < 0:
        raise CnnforgeError(
            f"{path}: labels range over {values.min()}..{values.max()}; labels must be class "
            "indices 0..N-1 (renumber them, or save class_names with them)"
        )
    top = int(values.max(initial=0)) if values.size else 0
    return tuple(str(i) for i in range(top + 1))
