"""The send window: at most one letter per worker process between DATA and the ledger's `sent`.

From the moment a letter's DATA goes to the relay, the relay may have accepted it; until the
ledger has committed `sent`, nothing says so. A worker killed in between leaves a claim that goes
stale, the reconciler takes it back and the letter goes out again, with the same Message-ID: the
one repeat the delivery contract allows, *at most one per kill*. Each worker thread has such a
window of its own, so without this gate one ``kill -9`` of a worker with N threads could repeat up
to N letters (the chaos runs measured 2–7 for 3 kills of a 4-thread worker, docs/chaos.md).

The gate lets one letter of the process at a time into the window. Only DATA → record is
serialised: claiming, rendering, building the message, MAIL FROM and RCPT TO of other letters go
on beside it, and wait (connection open, envelope accepted) only for DATA.

How it works:

* The worker thread takes a :class:`WindowTicket` for its letter (:meth:`SendWindow.ticket`) and
  hands it to the email channel with the message.
* The SMTP pool, on the event loop, calls :meth:`WindowTicket.acquire` just before DATA (with
  a relay that pipelines, just before the message, once DATA has its 354: only the message's
  closing dot lets the relay accept it); waiting is on the event loop, so it never blocks the
  loop or another letter's MAIL/RCPT.
* DATA refused or failed (no 250): the pool calls :meth:`WindowTicket.release` at once. That
  letter is recorded as a failure or a retry; a kill cannot make it a repeat that would not
  happen anyway.
* DATA accepted: the ticket stays held while the worker thread records the outcome; the thread
  closes it (:meth:`SendWindow.close`) right after ``ledger.finish`` has committed, and in any
  case when it is done with the letter (an error while recording, a time limit), so a ticket is
  never left held. Closing is thread-safe and idempotent; a ticket closed while its coroutine
  still waits for the window (the send was abandoned) gives it straight back.
* The window itself is a :class:`Turnstile`, not an ``asyncio.Lock``: the worker thread leaves
  it directly, and wakes the event loop only when a letter is waiting to go in. An
  ``asyncio.Lock`` can only be released on its loop, which cost every letter a second wake of
  the loop (a write to its self-pipe and a turn of it) even when nobody waited.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from dispatcher.errors import DispatchError


class WindowClosed(DispatchError, RuntimeError):
    """The worker thread gave up on this letter before its DATA could start."""


class Turnstile:
    """One holder at a time: entered from coroutines (of any event loop), left from any thread.
    A holder that leaves hands its turn straight to the first coroutine waiting, if any."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def held(self) -> bool:
        return self._held

    async def enter(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            with self._mutex:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)  # never given the turn
                    raise
            if not waiter.cancelled():
                # given the turn just before this task was cancelled: pass it on
                self.leave()
            # (a cancelled waiter that was handed the turn passes it on in _hand_over)
            raise

    def leave(self) -> None:
        """Give up the turn (the caller holds it), from any thread."""
        while True:
            with self._mutex:
                if not self._waiting:
                    self._held = False
                    return
                waiter = self._waiting.popleft()  # the turn is the waiter's from now on
            loop = waiter.get_loop()
            try:
                on_its_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                on_its_loop = False
            if on_its_loop:
                if waiter.cancelled():
                    continue  # its task gave up meanwhile: the next one's turn
                waiter.set_result(None)
                return
            try:
                loop.call_soon_threadsafe(self._hand_over, waiter)
            except RuntimeError:
                continue  # its loop is closed: the next one's turn
            return

    def _hand_over(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled():
            self.leave()
        else:
            waiter.set_result(None)


class WindowTicket:
    """One letter's pass through ``window``. ``acquire`` runs on the event loop; ``release`` and
    ``close`` from any thread. Worker threads get theirs from :meth:`SendWindow.ticket`."""

    def __init__(self, window: SendWindow) -> None:
        self._turnstile = window._turnstile
        self._mutex = threading.Lock()
        self._held = False
        self._closed = False

    @property
    def held(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        """Enter the window, just before DATA; waits while another letter of the process is in it."""
        with self._mutex:
            if self._closed:
                raise WindowClosed("the letter was given up before DATA")
        await self._turnstile.enter()
        with self._mutex:
            self._held = True
            closed = self._closed
        if closed:
            # Closed while we waited (close found nothing held to give back): give it back here.
            self.release()
            raise WindowClosed("the letter was given up before DATA")

    def release(self) -> None:
        """Leave the window: DATA failed, or the ticket is closed. Any thread; idempotent."""
        with self._mutex:
            if not self._held:
                return
            self._held = False
        self._turnstile.leave()

    def close(self) -> None:
        """Done with the letter (its outcome is recorded, or it was given up): leave the window
        and never enter it again. Any thread; idempotent."""
        with self._mutex:
            self._closed = True
        self.release()


class SendWindow:
    """The window of one worker process (one per :class:`DeliveryProcessor`), for its threads."""

    def __init__(self) -> None:
        self._turnstile = Turnstile()
        self._local = threading.local()

    @property
    def occupied(self) -> bool:
        """A letter is between DATA and its record (for tests and metrics)."""
        return self._turnstile.held

    def ticket(self) -> WindowTicket:
        """A ticket for the calling thread's current letter (an earlier one of the thread is closed)."""
        self.close()
        ticket = WindowTicket(self)
        self._local.ticket = ticket
        return ticket

    def close(self) -> None:
        """Close the calling thread's ticket, if it has one: its letter's outcome is recorded."""
        ticket = getattr(self._local, "ticket", None)
        if ticket is not None:
            self._local.ticket = None
            ticket.close()
