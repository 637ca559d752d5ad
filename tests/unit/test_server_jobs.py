"""The bounded job queue: immediate Busy when full, cancellation, shutdown, and the chunk channel."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from lipsync.errors import Busy, ShuttingDown
from lipsync.server.errors import JobCancelled
from lipsync.server.jobs import CancelToken, ChunkChannel, JobQueue
from tests.waiting import returns_within


def _blocking(gate: threading.Event, started: threading.Semaphore | None = None, value: object = None):
    def fn(token: CancelToken):
        if started is not None:
            started.release()
        assert gate.wait(10)
        return value

    return fn


@pytest.fixture
def queue():
    q = JobQueue(workers=1, queue_size=1)
    yield q
    q.shutdown(timeout=5)


def test_full_queue_refuses_at_once_and_frees_slots(queue: JobQueue) -> None:
    gate = threading.Event()
    started = threading.Semaphore(0)
    first = queue.submit(_blocking(gate, started, "a"))
    second = queue.submit(_blocking(gate, value="b"))
    assert started.acquire(timeout=5)
    state = queue.state()
    assert (state.in_flight, state.waiting, state.capacity) == (1, 1, 2)

    # Refused at once: both jobs are still held at the gate, which only opens below, so a submit
    # that waited for a free slot would never return.
    with pytest.raises(Busy) as info:
        returns_within(lambda: queue.submit(_blocking(gate)), what="submit to a full queue")
    assert info.value.retry_after_s >= 1
    assert type(info.value) is Busy

    gate.set()
    assert first.future.result(5) == "a"
    assert second.future.result(5) == "b"
    assert queue.join(5)
    state = queue.state()
    assert (state.in_flight, state.waiting) == (0, 0)
    # Capacity is back: two more jobs are taken.
    jobs = [queue.submit(lambda token, i=i: i) for i in range(2)]
    assert [j.future.result(5) for j in jobs] == [0, 1]


def test_job_exception_reaches_the_caller(queue: JobQueue) -> None:
    def boom(token: CancelToken):
        raise ValueError("engine exploded")

    job = queue.submit(boom)
    with pytest.raises(ValueError, match="engine exploded"):
        job.future.result(5)
    assert queue.join(5)


def test_job_cancelled_while_waiting_never_runs(queue: JobQueue) -> None:
    gate = threading.Event()
    started = threading.Semaphore(0)
    ran = threading.Event()
    queue.submit(_blocking(gate, started))
    assert started.acquire(timeout=5)
    waiting = queue.submit(lambda token: ran.set())
    waiting.token.cancel("client_disconnected")
    gate.set()
    with pytest.raises(JobCancelled):
        waiting.future.result(5)
    assert not ran.is_set()
    assert queue.join(5)


def test_close_refuses_new_jobs_but_finishes_queued_ones(queue: JobQueue) -> None:
    gate = threading.Event()
    started = threading.Semaphore(0)
    running = queue.submit(_blocking(gate, started, "running"))
    queued = queue.submit(_blocking(gate, value="queued"))
    assert started.acquire(timeout=5)
    queue.close()
    with pytest.raises(ShuttingDown):
        queue.submit(lambda token: None)
    assert not queue.join(timeout=0.2), "join must time out while a job is still running"
    gate.set()
    assert queue.join(timeout=5)
    assert running.future.result(0) == "running"
    assert queued.future.result(0) == "queued"


def test_wait_async_bridges_to_the_event_loop(queue: JobQueue) -> None:
    async def main() -> int:
        job = queue.submit(lambda token: threading.current_thread().name)
        name = await job.wait_async()
        assert name.startswith("lipsync-worker")
        return 1

    assert asyncio.run(main()) == 1


async def _until(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_chunk_channel_delivers_in_order_with_backpressure_and_stops_on_cancel() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        channel = ChunkChannel(loop, maxsize=2, poll_s=0.02)
        token = CancelToken()
        results: list[bool] = []

        def producer() -> None:
            for i in range(5):
                results.append(channel.put(i, token))

        thread = threading.Thread(target=producer)
        thread.start()
        await _until(lambda: len(results) == 2)
        await asyncio.sleep(0.2)
        # Back-pressure: the producer is stuck after filling the two slots.
        assert results == [True, True]
        assert [await channel.get(), await channel.get()] == [0, 1]
        await _until(lambda: len(results) == 4)
        token.cancel("client_disconnected")
        await asyncio.to_thread(thread.join, 5)
        assert not thread.is_alive(), "a cancelled producer must not stay blocked on a full channel"
        assert results == [True, True, True, True, False]
        assert [await channel.get(), await channel.get()] == [2, 3]

    asyncio.run(main())
