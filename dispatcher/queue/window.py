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
  closing dot lets the relay accept it): an ``asyncio.Lock`` of the process, so waiting never
  blocks the loop or another letter's MAIL/RCPT.
* DATA refused or failed (no 250): the pool calls :meth:`WindowTicket.release` at once. That
  letter is recorded as a failure or a retry; a kill cannot make it a repeat that would not
  happen anyway.
* DATA accepted: the ticket stays held while the worker thread records the outcome; the thread
  closes it (:meth:`SendWindow.close`) right after ``ledger.finish`` has committed, and in any
  case when it is done with the letter (an error while recording, a time limit), so a ticket is
  never left held. Closing is thread-safe and idempotent; a ticket closed while its coroutine
  still waits for the lock (the send was abandoned) gives the lock straight back.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from dispatcher.errors import DispatchError


class WindowClosed(DispatchError, RuntimeError):
    """The worker thread gave up on this letter before its DATA could start."""


class WindowTicket:
    """One letter's pass through ``window``. ``acquire``/``release`` run on the event loop;
    ``close`` from any thread. Worker threads get theirs from :meth:`SendWindow.ticket`."""

    def __init__(self, window: SendWindow) -> None:
        self._lock = window._lock
        self._mutex = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
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
            self._loop = asyncio.get_running_loop()
        await self._lock.acquire()
        self._held = True
        if self._closed:
            # Closed while we waited: whoever closed it scheduled a release that may have run already.
            self.release()
            raise WindowClosed("the letter was given up before DATA")

    def release(self) -> None:
        """Leave the window (on the event loop): DATA failed, or the ticket is closed. Idempotent."""
        if self._held:
            self._held = False
            self._lock.release()

    def close(self) -> None:
        """Done with the letter (its outcome is recorded, or it was given up): leave the window
        and never enter it again. Any thread; idempotent."""
        with self._mutex:
            self._closed = True
            loop = self._loop
        if loop is None:
            return  # never tried to enter: nothing to give back
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.release()
            return
        # RuntimeError: the loop is closed, the process is shutting down and the lock goes with it.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.release)


class SendWindow:
    """The window of one worker process (one per :class:`DeliveryProcessor`), for its threads."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._local = threading.local()

    @property
    def occupied(self) -> bool:
        """A letter is between DATA and its record (for tests and metrics)."""
        return self._lock.locked()

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
