"""One asyncio event loop per worker process, on its own thread.

dramatiq runs actors on plain threads; the fax gateways' clients (httpx) are async and keep
connection pools that belong to one loop. Actors hand their coroutines to this loop. (Email does
not: its SMTP pool is blocking and each worker thread sends its own letters, see
dispatcher/channels/email/pool.py.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "dispatcher-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result. A caller that stops waiting (timeout,
        or interrupted) cancels it: nothing goes on sending after its caller has given up and
        recorded the letter as a retry. A coroutine cancelled on the loop raises
        ``concurrent.futures.CancelledError`` here, as ``run_coroutine_threadsafe`` would."""
        call = _Call(coro)
        try:
            self.loop.call_soon_threadsafe(call.start)
        except RuntimeError:
            coro.close()  # the loop is closed: it will never run
            raise
        try:
            if not call.done.acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError
        except BaseException:
            with contextlib.suppress(RuntimeError):  # (closed meanwhile: nothing runs on it any more)
                self.loop.call_soon_threadsafe(call.cancel)
            raise
        return call.result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


class _Call(Generic[T]):
    """One coroutine handed to the loop, and its caller's wait for it.

    Why not ``asyncio.run_coroutine_threadsafe``: it chains the task to a
    concurrent.futures.Future, whose callbacks and condition variable cost the loop's thread
    about a tenth of its CPU per letter (bench/worker_path.py); a task's done callback that
    releases a lock is all the waiting thread needs."""

    __slots__ = ("coro", "done", "task")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self.coro = coro
        self.task: asyncio.Task[T] | None = None
        #: released (on the loop) when the task is done
        self.done = threading.Lock()
        self.done.acquire()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.coro)
        self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[T]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: a caller that stopped waiting never will
        self.done.release()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def result(self) -> T:
        """The task's result, or its exception raised (call once ``done`` is released)."""
        assert self.task is not None
        if self.task.cancelled():
            raise concurrent.futures.CancelledError()
        return self.task.result()
