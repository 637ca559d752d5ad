"""The bounded worker queue that runs engine work off the event loop.

At most ``workers`` jobs run at once and at most ``queue_size`` more wait. ``submit`` never blocks:
when running + waiting jobs already fill the capacity it raises ``Busy`` (with a Retry-After
estimate) at once, so an overloaded server answers 503 immediately instead of piling up
requests until they all time out. Workers are daemon threads, so a job stuck inside an engine
can delay shutdown by at most the graceful-shutdown timeout, never hang the process exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..errors import Busy, ShuttingDown
from .errors import JobCancelled

log = logging.getLogger("lipsync.server")

T = TypeVar("T")


class CancelToken:
    """Set by the request side (client gone, deadline passed); checked by the job between chunks."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise JobCancelled(self.reason or "cancelled")


@dataclass
class Job(Generic[T]):
    fn: Callable[[CancelToken], T]
    token: CancelToken
    future: concurrent.futures.Future
    submitted_at: float
    started_at: float | None = None

    def wait_async(self) -> asyncio.Future:
        """An asyncio future for the result, for the calling event loop."""
        return asyncio.wrap_future(self.future)


@dataclass(frozen=True)
class QueueState:
    workers: int
    capacity: int
    in_flight: int
    waiting: int
    accepting: bool


class JobQueue:
    """``workers`` threads, ``queue_size`` waiting slots, immediate ``Busy`` beyond that."""

    def __init__(self, workers: int, queue_size: int, *, name: str = "lipsync-worker") -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        self.workers = workers
        self.queue_size = queue_size
        self._pending: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._admitted = 0  # running + waiting
        self._running = 0
        self._accepting = True
        # Exponentially weighted mean job duration, for the Retry-After estimate.
        self._mean_job_s = 2.0
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def capacity(self) -> int:
        return self.workers + self.queue_size

    def state(self) -> QueueState:
        with self._cond:
            return QueueState(
                workers=self.workers,
                capacity=self.capacity,
                in_flight=self._running,
                waiting=self._admitted - self._running,
                accepting=self._accepting,
            )

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the mean job time per queued job and worker."""
        with self._cond:
            ahead = max(1, self._admitted - self.workers + 1)
            estimate = self._mean_job_s * ahead / self.workers
        return int(min(60, max(1, math.ceil(estimate))))

    def submit(self, fn: Callable[[CancelToken], T], *, token: CancelToken | None = None) -> Job[T]:
        """Queue ``fn(token)``; raises ``Busy`` (or ``ShuttingDown``) at once if it cannot be taken."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("server is shutting down; retry on another instance", retry_after_s=5)
            if self._admitted >= self.capacity:
                busy = True
            else:
                busy = False
                self._admitted += 1
        if busy:
            raise Busy(
                f"server busy: {self.workers} job(s) running and {self.queue_size} waiting; try again later",
                retry_after_s=self.retry_after_s(),
            )
        job: Job[T] = Job(
            fn=fn,
            token=token or CancelToken(),
            future=concurrent.futures.Future(),
            submitted_at=time.monotonic(),
        )
        self._pending.put(job)
        return job

    def _work(self) -> None:
        while True:
            job = self._pending.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                self._finish(None)
                continue
            with self._cond:
                self._running += 1
            job.started_at = time.monotonic()
            try:
                # A job whose client left while it waited is not worth starting.
                job.token.raise_if_cancelled()
                result = job.fn(job.token)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
            finally:
                self._finish(time.monotonic() - job.started_at, running=True)

    def _finish(self, seconds: float | None, *, running: bool = False) -> None:
        with self._cond:
            self._admitted -= 1
            if running:
                self._running -= 1
            if seconds is not None:
                self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * seconds
            self._cond.notify_all()

    def close(self) -> None:
        """Stop taking new jobs (they get ``ShuttingDown``); queued and running ones finish."""
        with self._cond:
            self._accepting = False

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is queued or running; True if that happened within ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._admitted > 0:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def shutdown(self, timeout: float | None = None) -> bool:
        """Close, wait for jobs (up to ``timeout``), stop the threads. True if all jobs finished."""
        self.close()
        finished = self.join(timeout)
        if not finished:
            log.warning(
                "shutdown: %d job(s) still running after %.0f s; abandoning them",
                self.state().in_flight,
                timeout or 0,
            )
        for _ in self._threads:
            self._pending.put(None)
        return finished


END_OF_STREAM = object()


class ChunkChannel:
    """A bounded hand-over of byte chunks from a worker thread to the event loop.

    The worker blocks while ``maxsize`` chunks are unread (back-pressure: a slow client slows the
    render instead of growing memory) but re-checks its cancel token every ``poll_s``, so a client
    that disconnects frees the worker within that time.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, maxsize: int = 4, poll_s: float = 0.2) -> None:
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
        self._poll_s = poll_s

    def put(self, item: object, token: CancelToken) -> bool:
        """From the worker: hand over ``item``; False if the request was cancelled meanwhile."""
        try:
            fut = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        except RuntimeError:  # the loop is gone (hard shutdown)
            return False
        while True:
            try:
                fut.result(timeout=self._poll_s)
                return True
            except concurrent.futures.TimeoutError:
                if token.cancelled:
                    fut.cancel()
                    return False
            except concurrent.futures.CancelledError:
                return False

    async def get(self) -> object:
        return await self._queue.get()
