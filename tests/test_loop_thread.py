"""The worker's event loop thread (dispatcher/queue/loop.py): what a worker thread gets back from
the coroutines it hands over, and what happens to one whose caller stopped waiting."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator

import pytest

from dispatcher.errors import TransientError
from dispatcher.queue.loop import LoopThread


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


def test_the_result_comes_back_to_the_calling_thread(loop: LoopThread) -> None:
    async def on_the_loop() -> tuple[str, bool]:
        await asyncio.sleep(0)
        return threading.current_thread().name, asyncio.get_running_loop() is loop.loop

    assert loop.run(on_the_loop(), timeout=5) == ("dispatcher-loop", True)


def test_the_coroutines_error_is_raised_in_the_calling_thread(loop: LoopThread) -> None:
    async def refused() -> None:
        raise TransientError("4.7.1 try again later", code=451)

    with pytest.raises(TransientError, match="try again later") as info:
        loop.run(refused(), timeout=5)
    assert info.value.code == 451


def test_threads_waiting_together_each_get_their_own_result(loop: LoopThread) -> None:
    async def echo(n: int) -> int:
        await asyncio.sleep(0.01 * (n % 3))
        return n

    results: dict[int, int] = {}

    def work(n: int) -> None:
        results[n] = loop.run(echo(n), timeout=5)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert results == {n: n for n in range(8)}


def test_a_coroutine_whose_caller_stopped_waiting_is_cancelled(loop: LoopThread) -> None:
    """The worker thread's send timeout (a fax gateway's send): the coroutine must not go on
    after its caller recorded the letter as a retry."""
    cancelled = threading.Event()

    async def stalled_send() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        loop.run(stalled_send(), timeout=0.2)
    assert cancelled.wait(2)


def test_a_coroutine_cancelled_on_the_loop_is_an_ordinary_error_for_the_caller(loop: LoopThread) -> None:
    # The worker records any Exception from a send as a retry; a CancelledError of asyncio (a
    # BaseException) would get past that, as it never did with run_coroutine_threadsafe.
    async def cancelled_by_shutdown() -> None:
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        await asyncio.sleep(1)

    with pytest.raises(concurrent.futures.CancelledError):
        loop.run(cancelled_by_shutdown(), timeout=5)


def test_a_coroutine_for_a_closed_loop_is_refused_and_never_left_unawaited() -> None:
    thread = LoopThread()
    thread.stop()

    async def never() -> None:
        raise AssertionError("ran on a closed loop")

    coro = never()
    with pytest.raises(RuntimeError, match="closed"):
        thread.run(coro, timeout=1)
    # closed: no "coroutine ... was never awaited" warning when it is collected
    assert coro.cr_frame is None
