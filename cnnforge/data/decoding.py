"""Reading image files in worker processes: their headers (the folder scan) and their pixels
by one ``Preprocessing``.

Pillow holds the GIL for most of the work on a small image (opening, header parsing, mode
conversion, the array copy), so threads decode no faster than one core. Folders of more than
``2 * CHUNK`` images are decoded in a process pool instead (``fork`` where the platform has it:
the workers start in milliseconds and share the parent's imports), a chunk of paths per task,
each chunk coming back as one uint8 array. Smaller folders are decoded in this process, where
starting workers would cost more than it saves. The pixels are those of
``preprocessing.apply(open_upright(path))`` either way: the same code runs in the workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np

from cnnforge.core.errors import CnnforgeError
from cnnforge.core.imagefiles import open_image_file
from cnnforge.core.preprocessing import Preprocessing

CHUNK = 256  # images a worker decodes per task
WORKERS_ENV = "CNNFORGE_DECODE_WORKERS"
_NO_ORIENTATION = frozenset({"PNG", "JPEG"})  # formats whose orientation lives in info only
_ORIENTATION_KEYS = ("exif", "xmp", "XML:com.adobe.xmp")
T = TypeVar("T")


def open_upright(path: Any) -> Any:
    """The decoded Pillow image of ``path`` (a documented format only:
    :func:`cnnforge.core.imagefiles.open_image_file`), turned as its EXIF (or XMP) orientation says.

    A PNG or JPEG without EXIF or XMP metadata has no orientation to apply, so it is returned
    as decoded (``ImageOps.exif_transpose`` would return a copy of the same pixels)."""
    from PIL import ImageOps

    with open_image_file(path) as image:
        image.load()
        if image.format in _NO_ORIENTATION and not any(k in image.info for k in _ORIENTATION_KEYS):
            return image
        return ImageOps.exif_transpose(image)


def decode_workers() -> int:
    """Worker processes for decoding: ``CNNFORGE_DECODE_WORKERS``, else the usable CPUs."""
    value = os.environ.get(WORKERS_ENV, "").strip()
    if value:
        # isdigit alone passes "²" (int() refuses it) and other scripts' digits
        if not (value.isascii() and value.isdigit()) or len(value) > 4:
            raise CnnforgeError(
                f"{WORKERS_ENV} must be a whole number of processes, got {value[:20]!r}; set it "
                "to e.g. 4, or unset it to use every CPU"
            )
        return max(1, int(value))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def decode_files(
    paths: Sequence[str], preprocessing: Preprocessing
) -> tuple[np.ndarray, dict[int, str]]:
    """(N, H, W, C) uint8 pixels of ``paths`` in this process, and the positions that failed
    (left black) with the reason."""
    out = np.zeros((len(paths), *preprocessing.size, preprocessing.channels), np.uint8)
    failed: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            out[i] = preprocessing.apply(open_upright(path))
        except Exception as exc:  # noqa: BLE001 - any undecodable image is reported, not raised
            failed[i] = reason(exc)
    return out, failed


def decode_chunks(
    paths: Sequence[str], preprocessing: Preprocessing, *, chunk: int | None = None
) -> Iterator[tuple[np.ndarray, dict[int, str]]]:
    """``decode_files`` of consecutive chunks of ``paths``, in order, by :func:`map_chunks`.
    ``chunk``: ``CHUNK`` images."""
    return map_chunks(partial(decode_files, preprocessing=preprocessing), paths, chunk)


def pool_workers(items: int, chunk: int | None = None) -> int:
    """The processes :func:`map_chunks` decodes ``items`` in: 1 (this process) for at most two
    chunks, one CPU, or inside a daemon process (it may not start processes of its own); else
    :func:`decode_workers`, at most one a chunk."""
    chunk = chunk or CHUNK
    workers = min(decode_workers(), -(-items // chunk))
    if workers < 2 or items <= 2 * chunk or multiprocessing.current_process().daemon:
        return 1
    return workers


def map_chunks(
    function: Callable[[list[Any]], T], items: Sequence[Any], chunk: int | None = None
) -> Iterator[T]:
    """``function`` of consecutive chunks of ``items``, in order; in worker processes when
    there are several chunks and CPUs (``function`` must then be picklable: a module-level
    function or a ``partial`` of one), with at most two chunks a worker in flight, so memory
    stays bounded by them whatever the number of items."""
    chunk = chunk or CHUNK
    starts = range(0, len(items), chunk)
    workers = pool_workers(len(items), chunk)
    if workers < 2:
        for start in starts:
            yield function(list(items[start : start + chunk]))
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: deque[Future[T]] = deque()
        try:
            for start in starts:
                pending.append(pool.submit(function, list(items[start : start + chunk])))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def decode_all(
    paths: Sequence[str], preprocessing: Preprocessing
) -> tuple[np.ndarray, dict[int, str]]:
    """``decode_files`` of every path, decoded by :func:`decode_chunks`."""
    out = np.zeros((len(paths), *preprocessing.size, preprocessing.channels), np.uint8)
    failed: dict[int, str] = {}
    start = 0
    for pixels, failures in decode_chunks(paths, preprocessing):
        out[start : start + len(pixels)] = pixels
        failed.update({start + i: why for i, why in failures.items()})
        start += len(pixels)
    return out, failed


def reason(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__
