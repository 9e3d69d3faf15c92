"""Reading image files in worker processes: their headers (the folder scan) and their pixels
by one ``Preprocessing``.

Pillow holds the GIL for most of the work on a small image (opening, header parsing, mode
conversion, the array copy), so threads decode no faster than one core. Folders of more than
``2 * CHUNK`` images are decoded in a :class:`DecodePool` instead, a chunk of paths per task,
each chunk coming back as one uint8 array. Smaller folders are decoded in this process, where
starting workers would cost more than it saves. The pixels are those of
``preprocessing.apply(open_upright(path))`` either way: the same code runs in the workers.

The workers are never forked from this process, which runs TensorFlow's and tf.data's threads
(a fork copies locks other threads hold): they come from a ``forkserver`` (a clean process
started once, with this module and Pillow already imported, that forks the workers), or are
spawned where the platform has no forkserver. A streamed folder's pool is started once for
its reader and reused every epoch. So, as for any ``multiprocessing`` code, a script that
calls cnnforge must keep its work under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import multiprocessing
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, TypeVar

import numpy as np

from cnnforge.core.cpus import available_cpus
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
    """Worker processes for decoding: ``CNNFORGE_DECODE_WORKERS``, else the CPUs this process
    may use (its affinity and cgroup quota: ``cnnforge.core.cpus.available_cpus``)."""
    value = os.environ.get(WORKERS_ENV, "").strip()
    if value:
        # isdigit alone passes "²" (int() refuses it) and other scripts' digits
        if not (value.isascii() and value.isdigit()) or len(value) > 4:
            raise CnnforgeError(
                f"{WORKERS_ENV} must be a whole number of processes, got {value[:20]!r}; set it "
                "to e.g. 4, or unset it to use every CPU"
            )
        return max(1, int(value))
    return available_cpus()


def _context() -> multiprocessing.context.BaseContext:
    """``forkserver`` (its server imports this module and Pillow once), else ``spawn``."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "PIL.Image", "PIL.ImageOps"])
    return context


class DecodePool:
    """Decoding worker processes, started on first use and reused until :meth:`close` (or
    until the pool is garbage collected): one pool serves every epoch of a streamed reader."""

    def __init__(self) -> None:
        self.workers = decode_workers()
        self._executor: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the forkserver now (before TensorFlow starts its threads, where the caller can
        call this early); the workers themselves start as chunks arrive."""
        context = _context()
        if context.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()

    def executor(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=_context())
            weakref.finalize(self, self._executor.shutdown, cancel_futures=True)
        return self._executor

    def close(self) -> None:
        """Stop the workers (a later use starts new ones)."""
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None


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
    paths: Sequence[str],
    preprocessing: Preprocessing,
    *,
    chunk: int | None = None,
    pool: DecodePool | None = None,
) -> Iterator[tuple[np.ndarray, dict[int, str]]]:
    """``decode_files`` of consecutive chunks of ``paths``, in order, by :func:`map_chunks`.
    ``chunk``: ``CHUNK`` images; ``pool``: the workers to use (else a pool for this call)."""
    return map_chunks(partial(decode_files, preprocessing=preprocessing), paths, chunk, pool)


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
    function: Callable[[list[Any]], T],
    items: Sequence[Any],
    chunk: int | None = None,
    pool: DecodePool | None = None,
) -> Iterator[T]:
    """``function`` of consecutive chunks of ``items``, in order; in the worker processes of
    ``pool`` (else of a pool for this call, closed after it) when there are several chunks
    and CPUs (``function`` must then be picklable: a module-level function or a ``partial``
    of one), with at most two chunks a worker in flight, so memory stays bounded by them
    whatever the number of items."""
    chunk = chunk or CHUNK
    starts = range(0, len(items), chunk)
    workers = pool_workers(len(items), chunk)
    if workers < 2:
        for start in starts:
            yield function(list(items[start : start + chunk]))
        return
    own = pool is None
    pool = pool or DecodePool()
    executor, in_flight = pool.executor(), 2 * min(workers, pool.workers)
    pending: deque[Future[T]] = deque()
    try:
        for start in starts:
            pending.append(executor.submit(function, list(items[start : start + chunk])))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        pool.close()
        raise CnnforgeError(
            "decoding worker processes stopped abruptly: they import the main script again, "
            'so a script that calls cnnforge must do so under if __name__ == "__main__": '
            "(or they were killed for memory); set CNNFORGE_DECODE_WORKERS=1 to decode in "
            "this process"
        ) from None
    finally:
        for future in pending:
            future.cancel()
        if own:
            pool.close()


def decode_all(
    paths: Sequence[str], preprocessing: Preprocessing, pool: DecodePool | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """``decode_files`` of every path, decoded by :func:`decode_chunks` (in ``pool``)."""
    out = np.zeros((len(paths), *preprocessing.size, preprocessing.channels), np.uint8)
    failed: dict[int, str] = {}
    start = 0
    for pixels, failures in decode_chunks(paths, preprocessing, pool=pool):
        out[start : start + len(pixels)] = pixels
        failed.update({start + i: why for i, why in failures.items()})
        start += len(pixels)
    return out, failed


def reason(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__
