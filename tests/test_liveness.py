"""Workers' liveness (dispatcher/queue/liveness.py): a worker killed mid-send has its letters sent
by another worker within a minute, not after the 11-minute stale-claim timeout; a live worker's
claims are never taken, not even across a Redis restart; a cleanly stopped worker leaves no key.

Real Redis, the real aiosmtpd test server (holding its DATA answer to keep a letter in flight),
SQLite, ``python -m dispatcher.cli worker`` subprocesses, the real reconciler with its production
configuration. The liveness TTL is shortened for these tests only (DISPATCH_WORKER_LIVENESS_SECONDS);
the chaos kill run (bench/chaos/run.py) checks the production default of 30 s.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dispatcher.app import Service
from dispatcher.ledger.models import State
from dispatcher.queue.liveness import DeadWorkers, Heartbeat, registry_key, worker_key
from dispatcher.settings import Settings
from tests.conftest import email_letters, enqueue, make_settings, wait_for
from tests.support.services import RedisServer
from tests.support.workers import Worker, message_ids, planned_message_id, sent_by, worker_env

sqlite = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

#: liveness TTL of these tests' workers and reconcilers (production: 30 s)
TTL = 3.0


def make_service(tmp_path: Path, database_url: str, redis_url: str, smtp_port: int, environ: dict[str, str]) -> Service:
    settings = make_settings(
        tmp_path, database_url=database_url, redis_url=redis_url, smtp_port=smtp_port, worker_liveness_seconds=TTL
    )
    service = Service(settings, environ=environ)
    service.ledger.migrate()
    return service


def live_worker_env(service: Service, environ: dict[str, str]) -> dict[str, str]:
    return worker_env(service, environ, DISPATCH_WORKER_LIVENESS_SECONDS=str(TTL))


@contextmanager
def reconciling(service: Service) -> Iterator[Any]:
    """The reconciler with its production configuration (stale claims after 11 minutes, housekeeping
    every 30 s), in a thread."""
    reconciler = service.reconciler()
    stop = threading.Event()
    thread = threading.Thread(target=reconciler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield reconciler
    finally:
        stop.set()
        thread.join(10)


def registered(service: Service) -> set[str]:
    client = service.broker.client
    return {m.decode() for m in client.smembers(registry_key(service.settings.redis_namespace))}


def worker_ids(service: Service, pid: int) -> set[str]:
    return {w for w in registered(service) if w.split(":")[1] == str(pid)}


def has_key(service: Service, worker_id: str) -> bool:
    return bool(service.broker.client.exists(worker_key(service.settings.redis_namespace, worker_id)))


def attempt_texts(service: Service, delivery_id: str) -> list[str]:
    return [a.text or "" for a in service.ledger.views.attempts(delivery_id)]


@sqlite
def test_a_worker_killed_mid_send_has_its_letter_sent_by_another_worker_within_a_minute(
    tmp_path, database_url, redis_server, environ, smtp
):
    service = make_service(tmp_path, database_url, redis_server.url, smtp.port, environ)
    [letter] = email_letters(service, 1)
    smtp.hold_data(20.0)  # the relay has the message; its answer never reaches w1
    env = live_worker_env(service, environ)
    w1 = Worker(env, tmp_path / "w1.log", "--threads", "1")
    w2 = None
    try:
        wait_for(lambda: worker_ids(service, w1.proc.pid), timeout=15)
        enqueue(service, [letter])
        wait_for(lambda: len(smtp.messages) == 1, timeout=15)  # mid-send: DATA sent, no answer yet
        assert service.ledger.views.state_of(letter) == State.SENDING
        [w1_id] = worker_ids(service, w1.proc.pid)
        w2 = Worker(env, tmp_path / "w2.log", "--threads", "1")
        wait_for(lambda: worker_ids(service, w2.proc.pid), timeout=15)

        with reconciling(service):
            w1.proc.send_signal(signal.SIGKILL)
            w1.proc.wait(5)
            killed = time.monotonic()
            wait_for(lambda: service.ledger.views.state_of(letter) == State.SENT, timeout=60)
            sent_after_s = time.monotonic() - killed
        # struck from the registry once its claim was taken back; its key lapsed
        assert w1_id not in registered(service) and not has_key(service, w1_id)

        # a clean stop deletes the worker's key at once
        [w2_id] = worker_ids(service, w2.proc.pid)
        assert has_key(service, w2_id)
        assert w2.terminate() < 10 and w2.proc.returncode == 0
        assert not has_key(service, w2_id) and w2_id not in registered(service)
    finally:
        for w in (w1, w2):
            if w is not None:
                w.close()
    print(f"kill -9 mid-send → letter sent by another worker after {sent_after_s:.1f} s (liveness TTL {TTL:g} s)")
    # TTL, two looks a sixth of it apart, a reconciler tick, the send: far from the 11-minute backstop
    assert sent_after_s < TTL + 5, sent_after_s
    assert sent_by(service)[letter] == [("transient", str(w1.proc.pid)), ("sent", str(w2.proc.pid))]
    assert attempt_texts(service, letter)[0] == "worker stopped answering mid-send (its liveness lapsed)"
    # The relay had the message when w1 died: it arrives twice, same Message-ID — the one repeat a
    # kill may cost, and no more.
    assert message_ids(smtp) == Counter({planned_message_id(service, letter): 2})


@sqlite
def test_a_live_workers_claim_is_never_released_while_it_sends_for_many_ttls(
    tmp_path, database_url, redis_server, environ, smtp
):
    service = make_service(tmp_path, database_url, redis_server.url, smtp.port, environ)
    [letter] = email_letters(service, 1)
    smtp.hold_data(4 * TTL)  # a slow relay: the send takes four TTLs
    w1 = Worker(live_worker_env(service, environ), tmp_path / "w1.log", "--threads", "1")
    try:
        with reconciling(service) as reconciler:
            enqueue(service, [letter])
            wait_for(lambda: len(smtp.messages) == 1, timeout=15)
            [w1_id] = worker_ids(service, w1.proc.pid)
            wait_for(lambda: service.ledger.views.state_of(letter) == State.SENT, timeout=4 * TTL + 10)
            assert reconciler.dead_workers is not None and reconciler.dead_workers.every == TTL / 6
        assert has_key(service, w1_id)  # renewed all along
    finally:
        w1.close()
    assert sent_by(service)[letter] == [("sent", str(w1.proc.pid))]
    assert message_ids(smtp) == Counter({planned_message_id(service, letter): 1})


@sqlite
def test_a_redis_restart_does_not_release_a_live_workers_claim(tmp_path, database_url, environ, smtp):
    """Redis down for longer than the TTL (the worker's key expires meanwhile, the AOF keeps the
    registration): the reconciler must give the worker time to set its key again."""
    with RedisServer(appendonly=True) as redis_server:
        service = make_service(tmp_path, database_url, redis_server.url, smtp.port, environ)
        [letter] = email_letters(service, 1)
        smtp.hold_data(4 * TTL)
        w1 = Worker(live_worker_env(service, environ), tmp_path / "w1.log", "--threads", "1")
        try:
            wait_for(lambda: worker_ids(service, w1.proc.pid), timeout=15)
            # Started now, Redis is within its grace: let the reconciler judge from the start.
            wait_for(lambda: float(service.broker.client.info("server")["uptime_in_seconds"]) > TTL, timeout=10)
            with reconciling(service):
                enqueue(service, [letter])
                wait_for(lambda: len(smtp.messages) == 1, timeout=15)
                [w1_id] = worker_ids(service, w1.proc.pid)
                redis_server.stop()
                time.sleep(TTL + 0.5)
                redis_server.start()
                wait_for(lambda: service.ledger.views.state_of(letter) == State.SENT, timeout=4 * TTL + 10)
                wait_for(lambda: has_key(service, w1_id), timeout=TTL)  # set again after the restart
                assert w1_id in registered(service)
        finally:
            w1.close()
        assert sent_by(service)[letter] == [("sent", str(w1.proc.pid))]
        assert message_ids(smtp) == Counter({planned_message_id(service, letter): 1})


# ---------------------------------------------------------------------------- the reconciler's look


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@sqlite
def test_a_worker_is_seen_dead_only_when_two_looks_in_a_row_miss_its_key(service: Service):
    client, ns = service.broker.client, service.settings.redis_namespace
    clock = Clock()
    looks = DeadWorkers(client, ns, ttl_seconds=30, clock=clock)
    looks.grace_seconds = 0  # the session's Redis may have just started
    alive = Heartbeat(client, ns, "host:1:aaaaaa", ttl_seconds=30)
    dying = Heartbeat(client, ns, "host:2:bbbbbb", ttl_seconds=30)
    assert alive.beat() and dying.beat()
    assert looks.look() == []
    client.delete(worker_key(ns, "host:2:bbbbbb"))  # its TTL ran out
    assert looks.look() == []  # first miss
    clock.now += 1
    assert looks.look() == []  # too soon to count as a second look
    clock.now += 4
    assert looks.look() == ["host:2:bbbbbb"]
    looks.forget(["host:2:bbbbbb"])
    assert registered(service) == {"host:1:aaaaaa"}
    clock.now += 5
    assert looks.look() == []


@sqlite
def test_a_key_that_comes_back_between_looks_is_not_a_death(service: Service):
    client, ns = service.broker.client, service.settings.redis_namespace
    clock = Clock()
    looks = DeadWorkers(client, ns, ttl_seconds=30, clock=clock)
    looks.grace_seconds = 0
    worker = Heartbeat(client, ns, "host:3:cccccc", ttl_seconds=30)
    worker.beat()
    client.delete(worker.key)
    assert looks.look() == []
    worker.beat()  # renewed just in time (a stalled process, a slow Redis)
    clock.now += 5
    assert looks.look() == []
    client.delete(worker.key)
    clock.now += 5
    assert looks.look() == []  # a new first miss, not the second


def test_no_worker_is_judged_until_redis_has_been_up_for_a_ttl(tmp_path: Path):
    """After a restart, keys that expired while Redis was down (or all of them, without
    persistence) are missing for workers that are alive and reconnecting."""
    with RedisServer(appendonly=True) as server:
        import redis

        client = redis.Redis.from_url(server.url)
        clock = Clock()
        looks = DeadWorkers(client, "g", ttl_seconds=1.5, clock=clock)
        Heartbeat(client, "g", "host:4:dddddd", ttl_seconds=1.5).beat()  # registered; never renewed
        server.stop()
        time.sleep(2)  # its key expires while Redis is down
        server.start()
        assert client.sismember(registry_key("g"), "host:4:dddddd")  # the AOF kept the registration
        for _ in range(3):
            assert looks.look() == []
            clock.now += 1
        # a dead worker is still found once the grace is over
        wait_for(lambda: float(client.info("server")["uptime_in_seconds"]) >= 2, timeout=5)
        assert looks.look() == []
        clock.now += 1
        assert looks.look() == ["host:4:dddddd"]
        client.close()


@sqlite
def test_a_claim_by_a_worker_without_liveness_is_left_to_the_stale_claim_timeout(service: Service):
    """A worker from before liveness (a rolling upgrade) never registered: its claim is not taken
    from it, however often the reconciler looks; the stale-claim release still is the backstop."""
    [letter] = email_letters(service, 1)
    now = datetime.now(UTC)
    enqueue(service, [letter])
    assert service.ledger.lifecycle.claim(letter, "old-host:123:4567", now) is not None
    reconciler = service.reconciler()
    assert reconciler.dead_workers is not None
    reconciler.dead_workers.grace_seconds = 0
    reconciler.dead_workers.every = 0
    for _ in range(3):
        assert reconciler.release_dead_workers(now) == []
    assert service.ledger.views.state_of(letter) == State.SENDING


def test_the_worker_liveness_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DISPATCH_WORKER_LIVENESS_SECONDS", raising=False)
    assert Settings.from_env().worker_liveness_seconds == 30.0
    monkeypatch.setenv("DISPATCH_WORKER_LIVENESS_SECONDS", "12")
    assert Settings.from_env().worker_liveness_seconds == 12.0
    monkeypatch.setenv("DISPATCH_WORKER_LIVENESS_SECONDS", "0")
    from dispatcher.errors import ConfigError

    with pytest.raises(ConfigError, match="DISPATCH_WORKER_LIVENESS_SECONDS"):
        Settings.from_env()
