"""Messages stranded in a live worker's dramatiq ack set (dispatcher/queue/strays.py).

dramatiq's Redis fetch moves message ids into the worker's ack set on the server; if the reply is
lost (Redis shutting down, a broken connection), the worker never sees them, keeps heartbeating,
and dramatiq's maintenance never gives them back. Real Redis throughout: the sweep on its own
with a clock we control, then a live worker whose fetch reply is lost through a proxy, once by a
broken connection and once by a real restart of a private redis-server with AOF.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from dispatcher.app import Service
from dispatcher.queue.actors import QUEUE
from dispatcher.queue.strays import StrandedMessages
from tests.conftest import appeal_body, make_settings, wait_for
from tests.support.proxy import ReplyLosingProxy
from tests.support.services import RedisServer

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def strand(service: Service) -> list[str]:
    """An appeal whose messages a fetch took into the service broker's ack set, and whose reply
    nobody read: what a lost reply leaves behind. Returns the delivery ids."""
    accepted = service.intake.submit(appeal_body())
    service.broker.do_fetch(QUEUE, 10)
    return [d.id for d in accepted.deliveries]


def queued_deliveries(service: Service) -> list[str]:
    ns = service.settings.redis_namespace
    client = service.broker.client
    ids = client.lrange(f"{ns}:{QUEUE}", 0, -1)
    if not ids:
        return []
    return [str(json.loads(data)["args"][0]) for data in client.hmget(f"{ns}:{QUEUE}.msgs", ids)]


def ack_set(service: Service) -> str:
    return f"{service.settings.redis_namespace}:__acks__.{service.broker.broker_id}.{QUEUE}"


def sweeper(service: Service, clock: Clock, after: float = 60) -> StrandedMessages:
    found = StrandedMessages.for_broker(service.broker, service.ledger.views.state_of, after=timedelta(seconds=after))
    assert found is not None
    found.clock = clock
    return found


# ---------------------------------------------------------------------------- the sweep


def test_a_stranded_message_goes_back_to_the_head_of_the_queue_after_the_delay(service):
    clock = Clock()
    strays = sweeper(service, clock)
    ids = strand(service)
    later = service.intake.submit(appeal_body())  # waiting normally on the queue
    assert service.broker.client.scard(ack_set(service)) == len(ids)

    assert strays.sweep() == []  # first seen now
    clock.now += 59
    assert strays.sweep() == []
    assert service.broker.client.scard(ack_set(service)) == len(ids)
    clock.now += 1
    assert sorted(strays.sweep()) == sorted(ids)

    assert service.broker.client.scard(ack_set(service)) == 0
    # ahead of the letters that were waiting on the queue all along
    assert sorted(queued_deliveries(service)[: len(ids)]) == sorted(ids)
    assert queued_deliveries(service)[len(ids) :] == [d.id for d in later.deliveries]
    assert strays.requeued == len(ids)
    clock.now += 600
    assert strays.sweep() == []  # nothing left to do


def test_a_message_whose_letter_is_being_sent_is_left_alone(service):
    clock = Clock()
    strays = sweeper(service, clock)
    sending, waiting = strand(service)
    assert service.ledger.lifecycle.claim(sending, "vm:1:1", datetime.now(UTC)) is not None

    strays.sweep()
    clock.now += 60
    assert strays.sweep() == [waiting]
    assert service.broker.client.scard(ack_set(service)) == 1


def test_a_message_acknowledged_meanwhile_is_not_revived(service):
    clock = Clock()
    strays = sweeper(service, clock)
    strand(service)
    strays.sweep()
    ns = service.settings.redis_namespace
    for message_id in service.broker.client.smembers(ack_set(service)):
        service.broker.do_ack(QUEUE, message_id.decode())  # the worker had them after all
    clock.now += 60
    assert strays.sweep() == []
    assert service.broker.client.llen(f"{ns}:{QUEUE}") == 0


def test_the_delay_counts_from_when_each_message_was_first_seen(service):
    clock = Clock()
    strays = sweeper(service, clock)
    first = strand(service)
    strays.sweep()
    clock.now += 30
    second = strand(service)
    strays.sweep()
    clock.now += 30
    assert sorted(strays.sweep()) == sorted(first)
    clock.now += 30
    assert sorted(strays.sweep()) == sorted(second)


def test_the_reconciler_sweeps_at_housekeeping_and_survives_redis_being_away(service, redis_server):
    reconciler = service.reconciler(housekeeping_every=0, stranded_after=timedelta(0))
    assert reconciler.strays is not None
    ids = strand(service)
    reconciler.tick()  # first seen
    reconciler.tick()  # due: pushed back
    assert sorted(queued_deliveries(service)) == sorted(ids)
    reconciler.strays.client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    reconciler.housekeeping(datetime.now(UTC))  # logged, not raised


# ---------------------------------------------------------------------------- a live worker


@pytest.mark.parametrize("lost_by", ["connection cut", "redis restart"])
def test_messages_a_live_worker_never_received_are_sent_after_the_sweep(tmp_path, database_url, environ, smtp, lost_by):
    with RedisServer(appendonly=True) as redis_server, ReplyLosingProxy(redis_server.port) as proxy:
        settings = make_settings(tmp_path, database_url=database_url, redis_url=redis_server.url, smtp_port=smtp.port)
        direct = Service(settings, environ=environ)  # intake, reconciler, and our look into Redis
        direct.ledger.migrate()
        proxied = Service(replace(settings, redis_url=proxy.url), environ=environ)  # the worker
        client = direct.broker.client
        ns = settings.redis_namespace
        handle: Any = None
        stop = threading.Event()
        try:
            handle = proxied.worker(threads=2)
            handle.start()
            broker = proxied.broker.broker_id
            acks = f"{ns}:__acks__.{broker}.{QUEUE}"
            beats = f"{ns}:__heartbeats__"
            wait_for(lambda: client.zscore(beats, broker) is not None, timeout=10)  # the worker polls
            # Redis will run the worker's fetch of our letters, and the reply will not arrive.
            proxy.lose_reply_containing = b'"actor_name":"deliver"'
            ids = [d.id for d in direct.intake.submit(appeal_body()).deliveries]
            assert proxy.lost.wait(10)
            stranded = client.smembers(acks)
            assert 1 <= len(stranded) <= len(ids)
            if lost_by == "connection cut":
                proxy.cut()
            else:
                redis_server.stop()  # SIGTERM: the AOF keeps the ack set
                redis_server.start()
            # The worker reconnects and polls again, heartbeating, and never sees those messages.
            beat = float(client.zscore(beats, broker) or 0)
            wait_for(lambda: float(client.zscore(beats, broker) or 0) > beat + 1500, timeout=20)
            assert client.smembers(acks) == stranded
            assert sorted(direct.ledger.views.state_of(i) for i in ids).count("queued") >= len(stranded)

            reconciler = direct.reconciler(interval=0.1, housekeeping_every=0.2, stranded_after=timedelta(seconds=0.5))
            threading.Thread(target=reconciler.run, args=(stop,), daemon=True).start()
            wait_for(lambda: {direct.ledger.views.state_of(i) for i in ids} <= {"sent", "delivered"}, timeout=30)
            assert reconciler.strays is not None and reconciler.strays.requeued == len(stranded)
            wait_for(lambda: client.scard(acks) == 0, timeout=10)
            assert len(smtp.messages) == 1  # the email letter, once
            for delivery_id in ids:
                assert len(direct.ledger.views.attempts(delivery_id)) == 1
        finally:
            stop.set()
            if handle is not None:
                handle.stop(timeout_ms=10_000)
            direct.ledger.dispose()
