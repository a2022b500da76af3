"""Group commit: the appeals that arrive while one transaction is being written share the next.

Each request still waits for the commit that holds its appeal before it answers (an appeal is
durable before its 202); what the requests share is the transaction's fixed cost (``BEGIN
IMMEDIATE``, one statement per table rather than per appeal, the commit) and the write lock,
which on SQLite is otherwise taken in turn by every request thread polling its busy handler.

One writer thread writes what is pending, a batch at a time. Under a light load every
transaction holds one appeal and nobody waits for company; under a burst the batch grows with
the queue. ``max_batch`` bounds one transaction's size. The thread is started by the first job
and ends after ``idle_seconds`` without one (a service that takes no appeals holds no thread).

Requests wait in either of two ways: a thread blocks (``write``), or a coroutine awaits
(``write_async``) while its event loop serves other requests. The second is the HTTP path: the
event loop parses and checks each request and hands only the transaction to the writer, so no
request needs a thread of its own (the thread pool's hand-offs, and the GIL they contend for,
were a third of the API's time per appeal; bench/intake.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

Job = TypeVar("Job")

#: who waits for a job: a blocked thread's future, or an event loop and its coroutine's future
_Waiter = Future[None] | tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class GroupCommit(Generic[Job]):
    def __init__(
        self,
        write: Callable[[list[Job]], None],
        *,
        max_batch: int = 64,
        idle_seconds: float = 10.0,
        name: str = "group-commit",
    ):
        """``write`` writes a batch in one transaction and records each job's outcome on the job
        itself; if it raises, every job of the batch gets the exception."""
        self._write = write
        self._max_batch = max_batch
        self._idle_seconds = idle_seconds
        self._name = name
        self._wake = threading.Condition()
        self._pending: list[tuple[Job, _Waiter]] = []
        self._writer: threading.Thread | None = None

    def write(self, job: Job) -> None:
        """Return once ``job`` is committed, in a batch of its own or with others; raise what
        the batch's transaction raised."""
        done: Future[None] = Future()
        self._submit(job, done)
        done.result()

    async def write_async(self, job: Job) -> None:
        """``write`` for a coroutine: its event loop goes on serving while the job is written."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._submit(job, (loop, done))
        await done

    def _submit(self, job: Job, waiter: _Waiter) -> None:
        with self._wake:
            self._pending.append((job, waiter))
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._writer.start()
            else:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._pending:
                    self._wake.wait(self._idle_seconds)
                    if not self._pending:
                        # under the lock: a job submitted from now on starts a new writer
                        self._writer = None
                        return
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
            failure: BaseException | None = None
            try:
                self._write([job for job, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - handed to each request of the batch
                failure = exc
            _wake_up([waiter for _, waiter in batch], failure)


def _wake_up(waiters: list[_Waiter], failure: BaseException | None) -> None:
    """Each thread's future is set here; each event loop is called once for all of its own
    (one wake-up of the loop per batch, not one per request)."""
    loops: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for waiter in waiters:
        if isinstance(waiter, Future):
            if failure is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(failure)
        else:
            loops.setdefault(waiter[0], []).append(waiter[1])
    for loop, futures in loops.items():
        # a closed loop (RuntimeError) has nobody waiting any more
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, futures, failure)


def _settle(futures: list[asyncio.Future[None]], failure: BaseException | None) -> None:
    for future in futures:
        if future.cancelled():
            continue  # the request went away; its appeal is written all the same
        if failure is None:
            future.set_result(None)
        else:
            future.set_exception(failure)
