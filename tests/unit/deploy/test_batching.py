"""The dynamic batcher on its own: gathering, limits, answers kept with their callers, the bounded
queue, draining on stop. ``run`` is a real numpy function whose rows identify their inputs."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.batching import Batcher, Overloaded, Stopped


def identify(batch: np.ndarray) -> np.ndarray:
    """Each row: the image's own id (its first pixel) and the size of the batch it ran in."""
    return np.stack([batch[:, 0], np.full(len(batch), len(batch), dtype=batch.dtype)], axis=1)


def images(*ids: float) -> np.ndarray:
    return np.array([[i, 0.0] for i in ids], dtype=np.float32)


def test_concurrent_jobs_share_batches_and_each_gets_its_own_rows():
    sizes: list[int] = []

    async def main():
        batcher = Batcher(
            identify,
            max_batch=8,
            max_wait_ms=50,
            max_queue=100,
            on_batch=lambda n, s: sizes.append(n),
        )
        batcher.start()
        jobs = [images(*range(10 * k, 10 * k + 1 + k % 3)) for k in range(40)]
        answers = await asyncio.gather(*(batcher.submit(job) for job in jobs))
        await batcher.stop()
        return jobs, answers

    jobs, answers = asyncio.run(main())
    for job, rows in zip(jobs, answers, strict=True):
        np.testing.assert_array_equal(rows[:, 0], job[:, 0])  # its own images, in order
    assert max(sizes) <= 8 and sum(sizes) == sum(len(j) for j in jobs)
    assert max(sizes) > 1, sizes  # gathered, not one by one


def test_a_lone_job_waits_at_most_max_wait():
    async def main():
        batcher = Batcher(identify, max_batch=64, max_wait_ms=30, max_queue=4)
        batcher.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        rows = await batcher.submit(images(7))
        elapsed = loop.time() - start
        await batcher.stop()
        return rows, elapsed

    rows, elapsed = asyncio.run(main())
    assert rows.tolist() == [[7, 1]]
    assert 0.02 < elapsed < 2


def test_with_nothing_arriving_a_lone_job_runs_at_once():
    async def main():
        batcher = Batcher(identify, max_batch=64, max_wait_ms=2000, max_queue=4, arriving=lambda: 0)
        batcher.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        rows = await batcher.submit(images(3))
        elapsed = loop.time() - start
        await batcher.stop()
        return rows, elapsed

    rows, elapsed = asyncio.run(main())
    assert rows.tolist() == [[3, 1]] and elapsed < 1


def test_a_full_queue_is_refused_at_once_and_stop_drains_what_was_queued():
    release = threading.Event()

    def blocked(batch: np.ndarray) -> np.ndarray:
        release.wait(10)
        return identify(batch)

    async def main():
        batcher = Batcher(blocked, max_batch=1, max_wait_ms=0, max_queue=2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(images(1)))
        await asyncio.sleep(0.05)  # the worker holds job 1 in run()
        queued = [asyncio.ensure_future(batcher.submit(images(i))) for i in (2, 3)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await batcher.submit(images(4))
        assert batcher.depth == 2
        release.set()
        stopping = asyncio.ensure_future(batcher.stop())
        answers = await asyncio.gather(running, *queued)
        await stopping
        return answers

    answers = asyncio.run(main())
    assert [a[0, 0] for a in answers] == [1, 2, 3]


def test_a_failing_run_fails_its_callers_and_the_batcher_goes_on():
    def picky(batch: np.ndarray) -> np.ndarray:
        if (batch[:, 0] < 0).any():
            raise ValueError("negative")
        return identify(batch)

    async def main():
        batcher = Batcher(picky, max_batch=1, max_wait_ms=0, max_queue=4)
        batcher.start()
        with pytest.raises(ValueError, match="negative"):
            await batcher.submit(images(-1))
        rows = await batcher.submit(images(5))
        await batcher.stop()
        return rows

    assert asyncio.run(main()).tolist() == [[5, 1]]


def test_limits_are_checked():
    with pytest.raises(CnnforgeError, match="max_batch"):
        Batcher(identify, max_batch=0, max_wait_ms=1, max_queue=1)

    async def main():
        batcher = Batcher(identify, max_batch=2, max_wait_ms=0, max_queue=1)
        with pytest.raises(CnnforgeError, match="1 to 2 images"):
            await batcher.submit(images(1, 2, 3))

    asyncio.run(main())


def test_a_batch_that_cannot_be_stacked_fails_its_callers_and_the_worker_lives():
    async def main():
        batcher = Batcher(identify, max_batch=8, max_wait_ms=200, max_queue=8)
        batcher.start()
        # gathered into one batch: images of two shapes, np.concatenate fails
        odd = np.zeros((1, 3), np.float32)
        results = await asyncio.wait_for(
            asyncio.gather(batcher.submit(images(1)), batcher.submit(odd), return_exceptions=True),
            10,
        )
        rows = await asyncio.wait_for(batcher.submit(images(6)), 10)
        await asyncio.wait_for(batcher.stop(), 10)
        return results, rows

    results, rows = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in results), results
    assert rows.tolist() == [[6, 1]]


def test_stop_returns_within_its_timeout_and_fails_what_it_could_not_answer():
    release = threading.Event()

    def stuck(batch: np.ndarray) -> np.ndarray:
        release.wait(30)
        return identify(batch)

    async def main():
        batcher = Batcher(stuck, max_batch=1, max_wait_ms=0, max_queue=4)
        batcher.start()
        jobs = [asyncio.ensure_future(batcher.submit(images(i))) for i in (1, 2)]
        await asyncio.sleep(0.05)  # job 1 runs (stuck), job 2 waits
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.wait_for(batcher.stop(timeout=0.2), 10)
        elapsed = loop.time() - start
        results = await asyncio.gather(*jobs, return_exceptions=True)
        return elapsed, results

    try:
        elapsed, results = asyncio.run(main())
    finally:
        release.set()
    assert elapsed < 5
    assert all(isinstance(r, Stopped) for r in results), results
