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
* The SMTP pool, in the same worker thread, calls :meth:`WindowTicket.acquire` just before DATA
  (with a relay that pipelines, just before the message, once DATA has its 354: only the
  message's closing dot lets the relay accept it). Only that thread waits; other letters'
  MAIL/RCPT go on in theirs.
* DATA refused or failed (no 250): the pool calls :meth:`WindowTicket.release` at once. That
  letter is recorded as a failure or a retry; a kill cannot make it a repeat that would not
  happen anyway.
* DATA accepted: the ticket stays held while the worker thread records the outcome; the thread
  closes it (:meth:`SendWindow.close`) right after ``ledger.finish`` has committed, and in any
  case when it is done with the letter (an error while recording, a time limit), so a ticket is
  never left held. Closing is thread-safe and idempotent; a ticket closed while another thread
  still waits with it for the window (the send was given up) gives the window straight back.
* The window itself is a plain ``threading.Lock``: every send now runs in a worker thread
  (dispatcher/channels/email/pool.py), so entering and leaving cost no event loop anything.
"""

from __future__ import annotations

import threading

from dispatcher.errors import DispatchError


class WindowClosed(DispatchError, RuntimeError):
    """The worker thread gave up on this letter before its DATA could start."""


class WindowTicket:
    """One letter's pass through ``window``; every method may be called from any thread. Worker
    threads get theirs from :meth:`SendWindow.ticket`."""

    def __init__(self, window: SendWindow) -> None:
        self._gate = window._gate
        self._mutex = threading.Lock()
        self._held = False
        self._closed = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self, timeout: float | None = None) -> None:
        """Enter the window, just before DATA; waits while another letter of the process is in
        it, ``timeout`` seconds at most (None: as long as it takes), then raises TimeoutError."""
        with self._mutex:
            if self._closed:
                raise WindowClosed("the letter was given up before DATA")
        if not self._gate.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            raise TimeoutError("timed out waiting for the send window")
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
        self._gate.release()

    def close(self) -> None:
        """Done with the letter (its outcome is recorded, or it was given up): leave the window
        and never enter it again. Any thread; idempotent."""
        with self._mutex:
            self._closed = True
        self.release()


class SendWindow:
    """The window of one worker process (one per :class:`DeliveryProcessor`), for its threads."""

    def __init__(self) -> None:
        # (a Lock may be released by a thread other than the one that acquired it: a ticket's
        # close, from the thread that gave its letter up)
        self._gate = threading.Lock()
        self._local = threading.local()

    @property
    def occupied(self) -> bool:
        """A letter is between DATA and its record (for tests and metrics)."""
        return self._gate.locked()

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
