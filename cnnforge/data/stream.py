"""Image folders larger than memory: ``ImageFiles``, images that are decoded when they are used.

``read_image_folder`` decodes a folder into memory when the decoded images fit under a bound
(:func:`memory_bound_bytes`: ``CNNFORGE_DATA_MEMORY_MB``, else a quarter of the machine's
memory, at most 4 GiB), the fast path. Above it, each split is an ``ImageFiles``: a file list
that behaves enough like a (N, H, W, C) uint8 array for every stage:

- ``x[index_array]`` and ``np.concatenate`` of them stay lazy (splits, subsets, train+val);
- ``x[i]``, ``x[a:b]``, ``x.astype`` and ``np.asarray(x)`` decode what they name;
- ``x.tf_dataset(labels, shuffle_seed=...)`` is the training input: a ``tf.data`` pipeline fed
  by a generator that shuffles the file indices (8 bytes an image) every epoch, then decodes
  them a chunk at a time in worker processes (``cnnforge.data.decoding``: Pillow holds the GIL,
  so threads would not go faster than one core) by the same ``Preprocessing`` as everywhere;
  the workers (a ``DecodePool``) are started once for the reader, shared by every ``ImageFiles``
  made from it, reused every epoch and stopped by ``close()`` or when the last one is gone;
  the training code batches and prefetches it and augments training batches only. The first
  epoch writes the decoded pixels to a disk cache (``PixelCache``, in :func:`cache_place`: on
  disk, never tmpfs unless the user asks) that later epochs read.

Memory of a search over ``ImageFiles`` is bounded by the batches and decoding chunks in flight
(two a worker, ``decoding.CHUNK`` images each) plus the index (8 bytes an image), not by the
decoded images. An image that fails to decode while streaming is
fed as black, and warned about once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.errors import CnnforgeWarning
from cnnforge.core.preprocessing import Preprocessing
from cnnforge.data import decoding
from cnnforge.data.decoding import DecodePool, decode_chunks, decode_files

MEMORY_ENV = "CNNFORGE_DATA_MEMORY_MB"
DISK_CACHE_ENV = "CNNFORGE_DATA_DISK_CACHE"
CACHE_DIR_ENV = "CNNFORGE_CACHE_DIR"
MOUNTS = Path("/proc/mounts")
RAM_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs"})
DISK_CACHE_MARGIN = 1 << 30  # free disk the pixel cache leaves
MAX_IN_MEMORY = 4 << 30


def memory_bound_bytes() -> int:
    """How many bytes of decoded images a folder may take in memory before it is streamed."""
    if os.environ.get(MEMORY_ENV):
        return int(float(os.environ[MEMORY_ENV]) * (1 << 20))
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 4 * MAX_IN_MEMORY
    return min(MAX_IN_MEMORY, physical // 4)


@dataclass(frozen=True)
class CachePlace:
    """Where streamed images' decoded pixels are cached (None: nowhere), and why."""

    folder: Path | None
    why: str
    in_memory: bool = False  # the user's folder is on tmpfs or ramfs

    def describe(self) -> str:
        return f"{self.folder} ({self.why})" if self.folder else f"none ({self.why})"


def cache_place(mounts: Path = MOUNTS) -> CachePlace:
    """The folder of the disk cache: ``CNNFORGE_CACHE_DIR`` (``cnnforge --cache-dir``) when
    set, wherever it is; else the first of ``$XDG_CACHE_HOME/cnnforge`` (``~/.cache/cnnforge``)
    and the temporary folder that is on disk, not in memory (tmpfs, the temporary folder on
    Debian 13, Fedora and Arch: a cache there would take the memory streaming saves); else
    none. ``mounts``: the mount table the file systems are read from."""
    if os.environ.get(CACHE_DIR_ENV):
        folder = Path(os.environ[CACHE_DIR_ENV]).expanduser()
        kind = file_system(folder, mounts)
        in_memory = kind in RAM_FILE_SYSTEMS
        memory = f"; {kind}: memory, not disk" if in_memory else ""
        return CachePlace(folder, f"{CACHE_DIR_ENV}{memory}", in_memory)
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnforge"
    for folder in (xdg, Path(tempfile.gettempdir())):
        kind = file_system(folder, mounts)
        if kind not in RAM_FILE_SYSTEMS:
            return CachePlace(folder, kind or "file system unknown")
    return CachePlace(
        None,
        f"{xdg} and {tempfile.gettempdir()} are tmpfs, in memory; set {CACHE_DIR_ENV} or "
        "cnnforge --cache-dir to a folder on disk",
    )


def file_system(path: Path, mounts: Path = MOUNTS) -> str:
    """The type of the file system ``path`` is on (``ext4``, ``tmpfs``…), from the mount
    table; "" when it cannot be read."""
    path = Path(os.path.abspath(path))
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return ""
    best, kind = -1, ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        if (point == path or point in path.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind


class ImageFiles:
    """Image files read as (N, H, W, C) uint8 by ``preprocessing``, decoded when used."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(
        self, paths: Sequence[str], preprocessing: Preprocessing, pool: DecodePool | None = None
    ) -> None:
        self.paths = np.asarray([str(p) for p in paths], dtype=object)
        self.preprocessing = preprocessing
        self.pool = pool or DecodePool()
        self._warned: set[str] = set()
        self._cache: PixelCache | None = None
        self._no_cache = False  # no place or room for one: not looked for again

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), *self.preprocessing.size, self.preprocessing.channels)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files, {self.preprocessing.describe()})"

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)):
            return self._decode(self.paths[index])
        if isinstance(index, slice):
            return self._decode_all(self.paths[index])
        return ImageFiles(self.paths[np.asarray(index)], self.preprocessing, self.pool)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self._decode_all(self.paths)
        return array if dtype is None else array.astype(dtype)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is np.concatenate and all(isinstance(a, ImageFiles) for a in args[0]):
            paths = np.concatenate([a.paths for a in args[0]])
            return ImageFiles(paths, self.preprocessing, self.pool)
        converted = [np.asarray(a) if isinstance(a, ImageFiles) else a for a in args]
        return func(*converted, **kwargs)

    def close(self) -> None:
        """Stop the decoding workers (shared with the ``ImageFiles`` made from this one)."""
        self.pool.close()

    def astype(self, dtype: Any) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def transpose(self, *axes: int) -> np.ndarray:
        return np.asarray(self).transpose(*axes)

    def _pixel_cache(self) -> PixelCache | None:
        """The disk cache of these files' decoded pixels, made on first use in
        :func:`cache_place` when the disk has room for it and ``CNNFORGE_DATA_DISK_CACHE`` is
        not 0; without a place on disk, warned once and not made."""
        if self._cache is not None or self._no_cache or os.environ.get(DISK_CACHE_ENV) == "0":
            return self._cache
        place = cache_place()
        if place.folder is None or place.in_memory:
            warnings.warn(
                f"disk cache of streamed images: {place.describe()}", CnnforgeWarning, stacklevel=3
            )
        if place.folder is None:
            self._no_cache = True
            return None
        try:
            place.folder.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(place.folder).free > self.nbytes + DISK_CACHE_MARGIN:
                self._cache = PixelCache(str(place.folder), self.shape[1:], len(self))
        except OSError as exc:
            warnings.warn(
                f"no disk cache of streamed images in {place.folder} ({exc.strerror}); every "
                f"epoch decodes again (set {CACHE_DIR_ENV} or cnnforge --cache-dir)",
                CnnforgeWarning,
                stacklevel=3,
            )
        self._no_cache = self._cache is None
        return self._cache

    def _decode(self, path: str) -> np.ndarray:
        pixels, failed = decode_files([path], self.preprocessing)
        self._warn_black([path], failed)
        return pixels[0]

    def _decode_all(self, paths: np.ndarray) -> np.ndarray:
        out = np.empty((len(paths), *self.shape[1:]), np.uint8)
        start = 0
        for pixels, failed in decode_chunks(paths, self.preprocessing, pool=self.pool):
            self._warn_black(paths[start : start + len(pixels)], failed)
            out[start : start + len(pixels)] = pixels
            start += len(pixels)
        return out

    def _warn_black(self, paths: Sequence[str], failed: dict[int, str]) -> None:
        """Files that broke after the scan are fed black, and warned about once each."""
        for index, why in failed.items():
            path = str(paths[index])
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(
                    f"cannot read image {path} ({why}); fed as a black image",
                    CnnforgeWarning,
                    stacklevel=3,
                )

    def tf_dataset(self, labels: np.ndarray, *, shuffle_seed: int | None = None) -> Any:
        """(image uint8, label) elements: the files in a new seeded order every epoch when
        ``shuffle_seed`` is given, else in order; decoded in worker processes, a chunk at a
        time (``cnnforge.data.decoding.decode_chunks``), by a generator tf.data prefetches."""
        import tensorflow as tf

        labels = np.asarray(labels, dtype=np.int64)
        epochs = iter(range(1 << 62))

        def chunks() -> Any:
            order = np.arange(len(self))
            if shuffle_seed is not None:
                np.random.default_rng([shuffle_seed, next(epochs)]).shuffle(order)
            cache = self._pixel_cache()
            if cache is not None and cache.filled:
                for start in range(0, len(order), decoding.CHUNK):
                    rows = order[start : start + decoding.CHUNK]
                    yield cache.read(rows), labels[rows]
                return
            paths, start = self.paths[order], 0
            for pixels, failed in decode_chunks(paths, self.preprocessing, pool=self.pool):
                self._warn_black(paths[start : start + len(pixels)], failed)
                rows = order[start : start + len(pixels)]
                if cache is not None:
                    cache.write(rows, pixels)
                yield pixels, labels[rows]
                start += len(pixels)
            if cache is not None:
                cache.filled = True

        signature = (
            tf.TensorSpec((None, *self.shape[1:]), tf.uint8),
            tf.TensorSpec((None,), tf.int64),
        )
        batches = tf.data.Dataset.from_generator(chunks, output_signature=signature)
        return batches.prefetch(1).unbatch()


class PixelCache:
    """Decoded images of an ``ImageFiles``, one row of H×W×C bytes each, in an anonymous
    temporary file (gone when it is closed or the process ends). Rows are written and read
    with ``pwrite``/``pread``, not mapped, so they take page cache the system can reclaim,
    not resident memory of this process."""

    def __init__(self, folder: str, shape: tuple[int, ...], rows: int) -> None:
        # held open for the life of the cache: closing it deletes it
        self.file = tempfile.TemporaryFile(dir=folder, prefix="cnnforge-pixels-")  # noqa: SIM115
        self.shape = shape
        self.row = int(np.prod(shape))
        self.filled = False
        os.ftruncate(self.file.fileno(), self.row * rows)

    def write(self, rows: np.ndarray, pixels: np.ndarray) -> None:
        fd = self.file.fileno()
        for row, image in zip(rows, pixels, strict=True):
            os.pwrite(fd, image.tobytes(), int(row) * self.row)

    def read(self, rows: np.ndarray) -> np.ndarray:
        fd, size = self.file.fileno(), self.row
        data = b"".join(os.pread(fd, size, int(row) * size) for row in rows)
        return np.frombuffer(data, np.uint8).reshape(len(rows), *self.shape)
