"""Image folders larger than memory: ``ImageFiles``, images that are decoded when they are used.

``read_image_folder`` decodes a folder into memory when the decoded images fit under a bound
(:func:`memory_bound_bytes`: ``CNNFORGE_DATA_MEMORY_MB``, else a quarter of the machine's
memory, at most 4 GiB), the fast path. Above it, each split is an ``ImageFiles``: a file list
that behaves enough like a (N, H, W, C) uint8 array for every stage:

- ``x[index_array]`` and ``np.concatenate`` of them stay lazy (splits, subsets, train+val);
- ``x[i]``, ``x[a:b]``, ``x.astype`` and ``np.asarray(x)`` decode what they name;
- ``x.tf_dataset(labels, shuffle_seed=...)`` is the training input: a ``tf.data`` pipeline that
  shuffles the file indices (16 bytes an image), then decodes in parallel
  (``num_parallel_calls=AUTOTUNE``) by the same ``Preprocessing`` as everywhere; the training
  code batches and prefetches it and augments training batches only. Nothing is cached.

Memory of a search over ``ImageFiles`` is bounded by the batches in flight plus the index (16
bytes an image), not by the decoded images. An image that fails to decode while streaming is
fed as black, and warned about once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnforge.core.errors import CnnforgeWarning
from cnnforge.core.preprocessing import Preprocessing

MEMORY_ENV = "CNNFORGE_DATA_MEMORY_MB"
MAX_IN_MEMORY = 4 << 30


def open_upright(path: Any) -> Any:
    """The decoded Pillow image of ``path``, turned as its EXIF orientation says."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def memory_bound_bytes() -> int:
    """How many bytes of decoded images a folder may take in memory before it is streamed."""
    if os.environ.get(MEMORY_ENV):
        return int(float(os.environ[MEMORY_ENV]) * (1 << 20))
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 4 * MAX_IN_MEMORY
    return min(MAX_IN_MEMORY, physical // 4)


class ImageFiles:
    """Image files read as (N, H, W, C) uint8 by ``preprocessing``, decoded when used."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: Sequence[str], preprocessing: Preprocessing) -> None:
        self.paths = np.asarray([str(p) for p in paths], dtype=object)
        self.preprocessing = preprocessing
        self._warned: set[str] = set()

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
        return ImageFiles(self.paths[np.asarray(index)], self.preprocessing)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self._decode_all(self.paths)
        return array if dtype is None else array.astype(dtype)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is np.concatenate and all(isinstance(a, ImageFiles) for a in args[0]):
            return ImageFiles(np.concatenate([a.paths for a in args[0]]), self.preprocessing)
        converted = [np.asarray(a) if isinstance(a, ImageFiles) else a for a in args]
        return func(*converted, **kwargs)

    def astype(self, dtype: Any) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def transpose(self, *axes: int) -> np.ndarray:
        return np.asarray(self).transpose(*axes)

    def _decode(self, path: str) -> np.ndarray:
        try:
            return self.preprocessing.apply(open_upright(path))
        except Exception as exc:  # noqa: BLE001 - a file that broke after the scan: fed black
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(
                    f"cannot read image {path} ({exc}); fed as a black image",
                    CnnforgeWarning,
                    stacklevel=2,
                )
            return np.zeros(self.shape[1:], np.uint8)

    def _decode_all(self, paths: np.ndarray) -> np.ndarray:
        out = np.empty((len(paths), *self.shape[1:]), np.uint8)
        for i, path in enumerate(paths):
            out[i] = self._decode(path)
        return out

    def tf_dataset(self, labels: np.ndarray, *, shuffle_seed: int | None = None) -> Any:
        """(image uint8, label) elements: the file indices shuffled (reshuffled every epoch)
        when ``shuffle_seed`` is given, then decoded in parallel, in order."""
        import tensorflow as tf

        index = tf.data.Dataset.from_tensor_slices((np.arange(len(self)), np.asarray(labels)))
        if shuffle_seed is not None:
            index = index.shuffle(len(self), seed=shuffle_seed, reshuffle_each_iteration=True)
        shape = self.shape[1:]

        def decode(i: Any, label: Any) -> Any:
            image = tf.numpy_function(
                lambda k: self._decode(self.paths[int(k)]), [i], tf.uint8, stateful=False
            )
            image.set_shape(shape)
            return image, label

        return index.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
