"""The send window (dispatcher/queue/window.py): at most one letter per worker process between
the start of its DATA and the ledger's `sent`, so that a kill -9 repeats at most one letter.

Against a real SMTP server (aiosmtpd on loopback), once without PIPELINING and once with it,
and a real ledger; the worker's processor is called from plain threads, as dramatiq's worker
threads call it. The window of each letter is measured from both ends: when the server read
its DATA command (with PIPELINING, DATA goes with MAIL and RCPT and the window opens later,
before the message: then when the server had the whole message), and when ``ledger.finish``
returned (committed) in the worker thread, with the recording made slow on purpose.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from dispatcher.errors import PermanentError, TransientError
from dispatcher.queue.window import SendWindow, WindowClosed, WindowTicket
from tests.conftest import appeal_body, wait_for
from tests.support.smtp import DROP, HANG, SmtpTestServer
from tests.test_email_pool import SENDER, TARGET, letter, make_pool

#: the worker tests run on SQLite only: the window does not depend on the database
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(params=[False, True], ids=["one command at a time", "pipelined"])
def smtp(request: pytest.FixtureRequest) -> Iterator[SmtpTestServer]:
    """The service's relay (conftest's ``service`` sends here), with and without PIPELINING."""
    with SmtpTestServer(pipelining=request.param) as server:
        yield server


@pytest.fixture
def processor(service: Any) -> Iterator[Any]:
    """The worker's DeliveryProcessor (its loop thread, email channel and window), no dramatiq."""
    handle = service.worker(threads=1)
    yield handle.processor
    handle.channels.get("email").close()
    handle.loop.stop()


def email_letters(service: Any, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        accepted = service.intake.submit(appeal_body())
        ids += [d.id for d in accepted.deliveries if d.channel == "email"]
    return ids


class FinishSpy:
    """ledger.finish, made slow (as under SQLite write contention) and observed: when it returned
    for each letter, and whether the window was occupied while the outcome was being recorded."""

    def __init__(self, processor: Any, delay: float = 0.0, fail_once: bool = False):
        self.processor = processor
        self.real = processor.ledger.lifecycle.finish
        self.delay = delay
        self.fail_once = fail_once
        self.committed: dict[str, float] = {}
        self.occupied_while_recording: dict[str, bool] = {}

    def __call__(self, claim: Any, result: Any, **kwargs: Any) -> bool:
        self.occupied_while_recording[claim.id] = self.processor.window.occupied
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("the database went away while recording")
        time.sleep(self.delay)
        moved = self.real(claim, result, **kwargs)
        self.committed[claim.id] = time.monotonic()
        return moved


def run_in_threads(processor: Any, ids: list[str], threads: int) -> None:
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(chunk: list[str]) -> None:
        try:
            barrier.wait(timeout=10)
            for delivery_id in chunk:
                processor(delivery_id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(ids[i::threads],)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in workers)
    assert not errors, errors


def windows(smtp: SmtpTestServer, spy: FinishSpy) -> list[tuple[float, float, str]]:
    """(server read DATA or, pipelined, the message, ledger committed `sent`, delivery) of every
    letter, by start."""
    out = []
    for m in smtp.messages:
        delivery = str(m.message["X-Dispatch-Delivery"])
        assert m.data_started_at > 0
        opened = m.received_at if smtp.pipelining else m.data_started_at
        out.append((opened, spy.committed[delivery], delivery))
    return sorted(out)


def overlaps(spans: list[tuple[float, float, str]]) -> int:
    return sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1])


def in_thread(fn: Any, *args: Any) -> None:
    """Call fn in a thread of its own (a worker thread: its own window ticket) and wait."""
    t = threading.Thread(target=fn, args=args)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive()


# ---------------------------------------------------------------------------- the worker


@sqlite_only
def test_the_worker_thread_sends_email_itself_without_the_event_loop(service, smtp, processor):
    # The email channel is blocking: a letter goes out from the worker's thread even with the
    # process's event loop stopped (the loop serves the fax gateways, not the SMTP pool).
    processor.loop.stop()
    [letter] = email_letters(service, 1)
    in_thread(processor, letter)
    assert service.ledger.views.state_of(letter) == "sent"
    assert [str(m.message["X-Dispatch-Delivery"]) for m in smtp.messages] == [letter]
    assert not processor.window.occupied


@sqlite_only
def test_letters_of_one_process_never_overlap_between_data_and_recorded(service, smtp, processor, monkeypatch):
    spy = FinishSpy(processor, delay=0.03)
    monkeypatch.setattr(processor.ledger.lifecycle, "finish", spy)
    ids = email_letters(service, 12)

    run_in_threads(processor, ids, threads=4)

    assert {service.ledger.views.state_of(i) for i in ids} == {"sent"}
    spans = windows(smtp, spy)
    assert len(spans) == 12
    # each letter's DATA reached the server only after the previous letter's `sent` was committed
    assert overlaps(spans) == 0, spans
    assert all(spy.occupied_while_recording[i] for i in ids)
    # the last release is handed to the event loop by the worker thread
    wait_for(lambda: not processor.window.occupied, timeout=2)


@sqlite_only
def test_without_the_window_the_same_letters_do_overlap(service, smtp, processor, monkeypatch):
    """The control for the test above: the measurement does see overlaps when there is no window
    (each thread's letter in its own DATA → record window, as before the window existed)."""
    spy = FinishSpy(processor, delay=0.03)
    monkeypatch.setattr(processor.ledger.lifecycle, "finish", spy)
    monkeypatch.setattr(processor.window, "ticket", lambda: None)
    ids = email_letters(service, 12)

    run_in_threads(processor, ids, threads=4)

    assert {service.ledger.views.state_of(i) for i in ids} == {"sent"}
    assert overlaps(windows(smtp, spy)) > 0


@sqlite_only
@pytest.mark.parametrize(
    ("replies", "state", "outcome"),
    [
        ([(554, "5.6.0 Content refused")], "bounced", "permanent"),
        ([(451, "4.3.0 Try again later")], "planned", "transient"),
        # the connection dies after the content, three quick tries in a row: retried later
        ([DROP, DROP, DROP], "planned", "transient"),
    ],
    ids=["554", "451", "dropped"],
)
def test_window_is_left_as_soon_as_data_fails(service, smtp, processor, monkeypatch, replies, state, outcome):
    spy = FinishSpy(processor)
    monkeypatch.setattr(processor.ledger.lifecycle, "finish", spy)
    smtp.script_data(replies)
    failing, later = email_letters(service, 2)

    processor(failing)

    assert service.ledger.views.state_of(failing) == state
    assert service.ledger.views.attempts(failing)[-1].outcome == outcome
    # released by the pool when DATA failed, before the outcome was recorded
    assert spy.occupied_while_recording[failing] is False
    assert not processor.window.occupied
    processor(later)
    assert service.ledger.views.state_of(later) == "sent"
    assert spy.occupied_while_recording[later] is True
    wait_for(lambda: not processor.window.occupied, timeout=2)


@sqlite_only
def test_window_is_left_when_recording_the_outcome_fails(service, smtp, processor, monkeypatch):
    spy = FinishSpy(processor, fail_once=True)
    monkeypatch.setattr(processor.ledger.lifecycle, "finish", spy)
    letter_id, later = email_letters(service, 2)

    with pytest.raises(RuntimeError, match="went away"):
        processor(letter_id)

    assert spy.occupied_while_recording[letter_id] is True
    wait_for(lambda: not processor.window.occupied, timeout=2)
    # the claim stays `sending` for the reconciler's stale-claim release, as after a crash
    assert service.ledger.views.state_of(letter_id) == "sending"
    in_thread(processor, later)
    assert service.ledger.views.state_of(later) == "sent"


@sqlite_only
def test_send_timing_out_in_data_leaves_the_window(service, smtp, processor, monkeypatch):
    monkeypatch.setattr(processor.channels.get("email"), "send_timeout", 0.5)
    smtp.script_data([HANG])
    stalled, later = email_letters(service, 2)

    processor(stalled)

    attempt = service.ledger.views.attempts(stalled)[-1]
    assert (attempt.outcome, attempt.text) == ("transient", "internal error: TimeoutError")
    wait_for(lambda: not processor.window.occupied, timeout=2)
    processor(later)
    assert service.ledger.views.state_of(later) == "sent"
    assert [str(m.message["X-Dispatch-Delivery"]) for m in smtp.messages] == [later]


@sqlite_only
def test_send_given_up_while_waiting_for_the_window_never_enters_it(service, smtp, processor, monkeypatch):
    monkeypatch.setattr(processor.channels.get("email"), "send_timeout", 0.5)
    waiting, later = email_letters(service, 2)
    # another letter of the process sits in the window (its recording is stuck)
    holder = WindowTicket(processor.window)
    holder.acquire(timeout=5)

    in_thread(processor, waiting)

    attempt = service.ledger.views.attempts(waiting)[-1]
    assert (attempt.outcome, attempt.text) == ("transient", "internal error: TimeoutError")
    holder.close()
    wait_for(lambda: not processor.window.occupied, timeout=2)
    time.sleep(0.2)  # a send that went on after its caller gave up would reach the server now
    assert smtp.messages == [] and "DATA" not in smtp.commands
    in_thread(processor, later)
    assert service.ledger.views.state_of(later) == "sent"
    wait_for(lambda: not processor.window.occupied, timeout=2)


# ---------------------------------------------------------------------------- the pool and tickets


@pytest.fixture(params=[False, True], ids=["one command at a time", "pipelined"])
def server(request: pytest.FixtureRequest) -> Iterator[SmtpTestServer]:
    with SmtpTestServer(pipelining=request.param) as smtp:
        yield smtp


def test_second_letters_data_waits_until_the_first_is_recorded(server: SmtpTestServer) -> None:
    window = SendWindow()
    pool = make_pool(server)
    first, second = WindowTicket(window), WindowTicket(window)
    try:
        pool.send(letter(1), SENDER, [TARGET], window=first)
        assert first.held and window.occupied  # until the caller has recorded it
        with ThreadPoolExecutor(1) as other_thread:
            sending = other_thread.submit(pool.send, letter(2), SENDER, [TARGET], window=second)
            server.wait_for(lambda: server.commands.count("RCPT") == 2)
            time.sleep(0.1)
            # the second envelope is accepted, its message held back
            assert len(server.messages) == 1 and not sending.done()
            if not server.pipelining:
                assert server.commands.count("DATA") == 1
            first.close()
            assert sending.result(timeout=5)[0] == 250
        assert len(server.messages) == 2 and second.held
        second.close()
        assert not window.occupied
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("reply", "error"), [((554, "5.6.0 refused"), PermanentError), ((452, "4.3.1 full"), TransientError)]
)
def test_refused_data_releases_the_ticket(server: SmtpTestServer, reply: Any, error: type) -> None:
    window = SendWindow()
    pool = make_pool(server)
    ticket = WindowTicket(window)
    server.script_data([reply])
    try:
        with pytest.raises(error):
            pool.send(letter(1), SENDER, [TARGET], window=ticket)
        assert not ticket.held and not window.occupied
        # the same ticket may try again (the channel's quick retries do)
        pool.send(letter(1), SENDER, [TARGET], window=ticket)
        assert ticket.held
        ticket.close()
        assert not window.occupied
    finally:
        pool.close()


def test_a_send_given_up_at_its_deadline_while_waiting_for_the_window_sends_nothing(server: SmtpTestServer) -> None:
    window = SendWindow()
    pool = make_pool(server)
    holder = WindowTicket(window)
    holder.acquire()
    try:
        with pytest.raises(TimeoutError):
            pool.send(letter(1), SENDER, [TARGET], window=window.ticket(), deadline=time.monotonic() + 0.3)
        holder.close()
        assert not window.occupied
        # the connection waited after DATA (or its 354): dropped, never given a message
        assert pool.stats.connections_closed == 1 and server.messages == []
        pool.send(letter(2), SENDER, [TARGET])
        assert [m.message["Subject"] for m in server.messages] == ["letter 2"]
    finally:
        pool.close()


def test_ticket_closed_while_waiting_never_takes_the_window() -> None:
    window = SendWindow()
    holder, waiter = WindowTicket(window), WindowTicket(window)
    holder.acquire()
    with ThreadPoolExecutor(1) as other_thread:
        waiting = other_thread.submit(waiter.acquire)
        time.sleep(0.05)
        waiter.close()  # from this thread: the letter was given up
        holder.close()
        with pytest.raises(WindowClosed):
            waiting.result(timeout=2)
    assert not window.occupied and not waiter.held
    with pytest.raises(WindowClosed):
        waiter.acquire()


def test_waiting_for_the_window_times_out() -> None:
    window = SendWindow()
    holder, waiter = WindowTicket(window), WindowTicket(window)
    holder.acquire()
    with pytest.raises(TimeoutError):
        waiter.acquire(timeout=0.05)
    assert not waiter.held
    holder.close()
    waiter.acquire(timeout=0.05)
    assert waiter.held and window.occupied
    waiter.close()
    assert not window.occupied


def test_closing_is_idempotent_and_a_thread_has_one_ticket() -> None:
    window = SendWindow()
    first = window.ticket()
    first.acquire()
    second = window.ticket()  # the thread's next letter: the earlier ticket is closed
    assert not first.held and not window.occupied
    second.acquire()
    window.close()
    window.close()
    second.close()
    assert not window.occupied


def test_holders_on_many_threads_never_overlap() -> None:
    window = SendWindow()
    inside = most = entries = 0
    counter = threading.Lock()

    def worker() -> None:
        nonlocal inside, most, entries
        for _ in range(200):
            ticket = window.ticket()
            ticket.acquire(timeout=10)
            with counter:
                inside += 1
                entries += 1
                most = max(most, inside)
            time.sleep(0)  # let another thread try its luck
            with counter:
                inside -= 1
            window.close()  # this thread's letter is recorded

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert (entries, most) == (1200, 1)
    assert not window.occupied
