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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cnnforge.core.errors import CnnforgeError


class Overloaded(Exception):
    """The queue is full: the caller should come back later (HTTP 503 with Retry-After)."""


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

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet in a batch)."""
        return self._queue.qsize() + (self._held is not None)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Answer every job already queued, then stop the worker."""
        while self.depth or self._busy:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

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
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _gather(self) -> list[_Job]:
        first = await self._next(None)
        jobs, count = [first], len(first.images)
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
        return jobs

    async def _work(self) -> None:
        while True:
            jobs = await self._gather()
            self._busy = True
            try:
                await self._answer(jobs)
            finally:
                self._busy = False

    async def _answer(self, jobs: list[_Job]) -> None:
        batch = np.concatenate([job.images for job in jobs])
        start = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            rows = await loop.run_in_executor(self._executor, self.run, batch)
        except Exception as exc:  # every caller of this batch hears of it
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - start)
        offset = 0
        for job in jobs:
            size = len(job.images)
            if not job.future.done():  # a caller that went away has a cancelled future
                job.future.set_result(rows[offset : offset + size])
            offset += size
