"""Graceful shutdown of ``dispatcher worker`` on SIGTERM, as real processes: the letter in flight
is finished and recorded, unstarted messages go back to Redis at once (another worker sends them
while the stopping one is still busy), and a send that outlasts ``--shutdown-timeout`` is handed
back — its claim released, a message on the queue — for another worker to send at once.

Real Redis, the real aiosmtpd test server (holding its answer to DATA to keep a letter in
flight), SQLite, ``python -m dispatcher.cli worker`` subprocesses."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dispatcher.app import Service
from dispatcher.ledger.models import State
from dispatcher.queue.actors import QUEUE
from tests.conftest import email_letters, enqueue, make_settings, wait_for
from tests.support.workers import Worker, message_ids, planned_message_id, sent_by, worker_env

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def make_service(tmp_path: Path, database_url: str, redis_url: str, smtp_port: int, environ: dict[str, str]) -> Service:
    settings = make_settings(tmp_path, database_url=database_url, redis_url=redis_url, smtp_port=smtp_port)
    service = Service(settings, environ=environ)
    service.ledger.migrate()
    return service


def ack_sets(service: Service) -> dict[str, int]:
    """Every worker's set of fetched, unacknowledged messages, by Redis key, with its size."""
    client = service.broker.client
    keys = client.keys(f"{service.settings.redis_namespace}:__acks__.*")
    return {k.decode(): int(client.scard(k)) for k in keys}


def queue_length(service: Service) -> int:
    return int(service.broker.client.llen(f"{service.settings.redis_namespace}:{QUEUE}"))


def workers_seen(service: Service) -> int:
    """Brokers that have talked to Redis (each command is a heartbeat), other than the test's own."""
    members = service.broker.client.zrange(f"{service.settings.redis_namespace}:__heartbeats__", 0, -1)
    return len({m.decode() for m in members} - {service.broker.broker_id})


def test_sigterm_finishes_the_letter_in_flight_and_hands_unstarted_ones_back_at_once(
    tmp_path, database_url, redis_server, environ, smtp
):
    service = make_service(tmp_path, database_url, redis_server.url, smtp.port, environ)
    letters = email_letters(service, 6)
    smtp.hold_data(4.0)  # the first letter's DATA is answered 4 s after the message arrived
    enqueue(service, letters)
    # one thread, six messages prefetched: one in flight, five waiting in the worker's memory
    env = worker_env(service, environ)
    w1 = Worker({**env, "dramatiq_queue_prefetch": "6"}, tmp_path / "w1.log", "--threads", "1")
    w2 = None
    try:
        wait_for(lambda: len(smtp.messages) == 1, timeout=15)  # in flight: DATA sent, no answer yet
        in_flight = letters[0]
        assert service.ledger.views.state_of(in_flight) == State.SENDING
        assert list(ack_sets(service).values()) == [6] and queue_length(service) == 0
        # a second worker, idle: w1 holds every message
        w2 = Worker(env, tmp_path / "w2.log", "--threads", "2")
        wait_for(lambda: workers_seen(service) == 2, timeout=15)
        assert len(smtp.messages) == 1

        signalled = time.monotonic()
        w1.proc.send_signal(signal.SIGTERM)
        # the five unstarted letters reach w2 and go out while w1 is still waiting for its DATA reply
        # (dramatiq's own stop would return them only after that letter is done)
        wait_for(lambda: len(smtp.messages) == 6, timeout=10)
        others_sent_s = time.monotonic() - signalled
        assert service.ledger.views.state_of(in_flight) == State.SENDING
        assert w1.proc.poll() is None, "w1 should still be finishing its letter"
        w1.proc.wait(timeout=10)
        exited = time.monotonic()
        exit_s = exited - signalled
        assert w1.proc.returncode == 0
        assert exit_s < 5.0, exit_s  # what is left of the 4 s hold, plus closing up
        after_reply_s = exited - (smtp.messages[0].received_at + 4.0)
        wait_for(lambda: all(service.ledger.views.state_of(d) == State.SENT for d in letters), timeout=10)
    finally:
        for w in (w1, w2):
            if w is not None:
                w.close()
    print(
        f"SIGTERM → the five other letters sent by w2: {others_sent_s:.2f} s; → w1 exited: {exit_s:.2f} s "
        f"({after_reply_s:.2f} s after its DATA reply)"
    )

    attempts = sent_by(service)
    w1_pid, w2_pid = str(w1.proc.pid), str(w2.proc.pid)
    assert attempts[in_flight] == [("sent", w1_pid)]  # finished and recorded by the stopping worker
    for d in letters[1:]:
        assert attempts[d] == [("sent", w2_pid)]  # never started by w1: no attempt, no claim
    assert message_ids(smtp) == Counter({planned_message_id(service, d): 1 for d in letters})
    assert not any(ack_sets(service).values())  # nothing left stranded in w1's ack set
    [stopped] = w1.events("worker.stopped")
    assert stopped["returned"] == 5 and stopped["handed_back"] == [] and stopped["stragglers"] == 0


def test_send_outlasting_the_shutdown_timeout_is_handed_back_and_sent_by_another_worker(
    tmp_path, database_url, redis_server, environ, smtp
):
    service = make_service(tmp_path, database_url, redis_server.url, smtp.port, environ)
    [letter] = email_letters(service, 1)
    smtp.hold_data(6.0)  # longer than w1's shutdown timeout
    enqueue(service, [letter])
    env = worker_env(service, environ)
    w1 = Worker(env, tmp_path / "w1.log", "--threads", "1", "--shutdown-timeout", "1")
    w2 = None
    try:
        wait_for(lambda: len(smtp.messages) == 1, timeout=15)
        assert service.ledger.views.state_of(letter) == State.SENDING
        exit_s = w1.terminate()
        assert w1.proc.returncode == 0
        assert 1.0 <= exit_s < 3.0, exit_s
        # handed back: claim released (not left for the 11-minute stale-claim release), a fresh
        # message on the queue, nothing in w1's ack set
        assert service.ledger.views.state_of(letter) == State.QUEUED
        assert queue_length(service) == 1
        assert not any(ack_sets(service).values())
        [event] = w1.events("delivery.handed_back")
        assert event["delivery"] == letter

        started = time.monotonic()
        w2 = Worker(env, tmp_path / "w2.log", "--threads", "1")
        wait_for(lambda: service.ledger.views.state_of(letter) == State.SENT, timeout=15)
        picked_up_s = time.monotonic() - started
    finally:
        for w in (w1, w2):
            if w is not None:
                w.close()
    print(f"SIGTERM → w1 exited: {exit_s:.2f} s; w2 start → letter sent: {picked_up_s:.2f} s")
    assert sent_by(service)[letter] == [("transient", str(w1.proc.pid)), ("sent", str(w2.proc.pid))]
    # The documented price: the relay had the message when w1 gave up waiting for its answer, so
    # it arrives twice — same Message-ID, at most once more per hand-back.
    assert message_ids(smtp) == Counter({planned_message_id(service, letter): 2})


def test_a_second_signal_hands_back_at_once(tmp_path, database_url, redis_server, environ, smtp):
    service = make_service(tmp_path, database_url, redis_server.url, smtp.port, environ)
    [letter] = email_letters(service, 1)
    smtp.hold_data(6.0)
    enqueue(service, [letter])
    w1 = Worker(worker_env(service, environ), tmp_path / "w1.log", "--threads", "1", "--shutdown-timeout", "30")
    try:
        wait_for(lambda: len(smtp.messages) == 1, timeout=15)
        signalled = time.monotonic()
        w1.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert w1.proc.poll() is None  # waiting for its letter, as the first signal asks
        w1.proc.send_signal(signal.SIGINT)  # an impatient operator: Ctrl-C
        w1.proc.wait(timeout=5)
        exit_s = time.monotonic() - signalled
    finally:
        w1.close()
    assert w1.proc.returncode == 0 and exit_s < 2.0, exit_s
    assert service.ledger.views.state_of(letter) == State.QUEUED and queue_length(service) == 1


def test_messages_a_redis_consumer_fetched_but_never_handed_on_go_back(service):
    """dramatiq's Redis consumer fetches several messages at once and yields them one by one; a
    consumer stopped in between would leave the rest in its ack set until the heartbeat timeout."""
    from dispatcher.queue.shutdown import InFlight, _heartbeat

    ids = email_letters(service, 3)
    enqueue(service, ids)
    consumer = service.broker.consume(QUEUE, prefetch=3, timeout=100)
    first = next(consumer)
    assert first is not None and first.args[0] == ids[0]
    assert len(consumer.message_cache) == 2 and list(ack_sets(service).values()) == [3]

    class Thread:  # the part of dramatiq's ConsumerThread the hook uses
        def __init__(self) -> None:
            self.consumer = consumer

        def requeue_messages(self, messages: Any) -> None:
            consumer.requeue(messages)

    in_flight = InFlight()
    in_flight.before_consumer_thread_shutdown(service.broker, Thread())
    assert in_flight.cache_returned == 2 and consumer.message_cache == []
    assert queue_length(service) == 2 and list(ack_sets(service).values()) == [1]  # the one yielded stays
    # while a stopping worker waits for its letters, it keeps its heartbeat
    key = f"{service.settings.redis_namespace}:__heartbeats__"
    before = service.broker.client.zscore(key, service.broker.broker_id)
    time.sleep(0.01)
    _heartbeat(service.broker)
    assert service.broker.client.zscore(key, service.broker.broker_id) > before
