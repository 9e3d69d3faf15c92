"""Dynamic batching for the server: concurrent requests gathered into one onnxruntime call.

Each request puts one job (its images, stacked) on a bounded asyncio queue and awaits its own
future. One worker takes the first job, then keeps gathering for up to ``max_wait_ms`` or until
``max_batch`` images are in hand, runs them as one batch in a worker thread (the event loop
stays free to accept requests) and hands each job back exactly the rows it brought, in order:
answers travel with their futures, never by position in a shared list. A full queue is refused
at once (:class:`Overloaded`), so memory stays bounded however many callers arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cnnforge.core.errors import CnnforgeError

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 30.0


class Overloaded(Exception):
    """The queue is full: the caller should come back later (HTTP 503 with Retry-After)."""


class Stopped(Exception):
    """The batcher stopped before this job was answered."""


@dataclass
class _Job:
    images: np.ndarray  # (k, ...) the model's input, k ≤ max_batch
    future: asyncio.Future


class Batcher:
    """Gathers jobs into batches of at most ``max_batch`` images for ``run``.

    ``run`` takes one stacked batch and returns one row per image; it runs in a single worker
    thread, so calls never overlap. ``on_batch(size, seconds)`` is told of every batch run.
    ``arriving()``, if given, counts jobs on their way (requests being read and decoded): when
    none is queued and none is arriving, the batch runs at once instead of waiting out
    ``max_wait_ms`` for nobody, so a lone caller does not pay the wait.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
        arriving: Callable[[], int] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise CnnforgeError(
                f"max_batch ({max_batch}) and max_queue ({max_queue}) must be at least 1 and "
                f"max_wait_ms ({max_wait_ms}) at least 0"
            )
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1e3
        self.on_batch, self.arriving = on_batch, arriving
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self._held: _Job | None = None  # took it, but it did not fit the last batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnforge-batch")
        self._worker: asyncio.Task | None = None
        self._busy = False  # a batch is gathered and not yet answered
        self._current: list[_Job] = []  # the jobs being gathered or answered

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet in a batch)."""
        return self._queue.qsize() + (self._held is not None)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Answer every job already queued (for at most ``timeout`` seconds, and only while the
        worker lives), then stop the worker; a job still unanswered gets :class:`Stopped`."""
        deadline = time.monotonic() + timeout
        while (self.depth or self._busy) and time.monotonic() < deadline:
            if self._worker is None or self._worker.done():
                break
            await asyncio.sleep(0.01)
        running = self._busy  # a batch past the timeout: its thread is left to finish
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        leftover = self._current + ([self._held] if self._held is not None else [])
        self._held = None
        while not self._queue.empty():
            leftover.append(self._queue.get_nowait())
        _fail(leftover, Stopped("the server stopped before answering; send it again"))
        self._executor.shutdown(wait=not running, cancel_futures=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """The rows of ``run`` for ``images`` (at most ``max_batch``); :class:`Overloaded` when
        the queue is full."""
        if not 1 <= len(images) <= self.max_batch:
            raise CnnforgeError(f"a job holds 1 to {self.max_batch} images, got {len(images)}")
        job = _Job(images, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded from None
        return await job.future

    async def _next(self, timeout: float | None) -> _Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        if not self._queue.empty():  # at once: wait_for would make a task and a timer for it
            return self._queue.get_nowait()
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _gather(self, jobs: list[_Job]) -> None:
        """Fill ``jobs`` (the caller's, so a failure midway still knows whom to answer)."""
        first = await self._next(None)
        jobs.append(first)
        count = len(first.images)
        deadline = time.monotonic() + self.max_wait
        while count < self.max_batch:
            if self.arriving is not None and not self.depth and not self.arriving():
                break
            job = await self._next(deadline - time.monotonic())
            if job is None:
                break
            if count + len(job.images) > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            count += len(job.images)

    async def _work(self) -> None:
        """Batch after batch until cancelled; a failure fails that batch's jobs, not the loop
        (a dead worker would leave every later caller waiting forever)."""
        while True:
            jobs: list[_Job] = []
            self._current = jobs
            try:
                await self._gather(jobs)
                self._busy = True
                await self._answer(jobs)
            except Exception as exc:
                log.exception("a batch of %d jobs failed", len(jobs))
                _fail(jobs, exc)
            finally:
                self._busy = False

    async def _answer(self, jobs: list[_Job]) -> None:
        batch = np.concatenate([job.images for job in jobs])
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._executor, self.run, batch)
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - start)
        offset = 0
        for job in jobs:
            size = len(job.images)
            if not job.future.done():  # a caller that went away has a cancelled future
                job.future.set_result(rows[offset : offset + size])
            offset += size


def _fail(jobs: list[_Job], exc: BaseException) -> None:
    """Every caller of ``jobs`` still waiting hears of ``exc``."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)
