"""The worker's Redis consumer (dispatcher/queue/consumer.py): fetches and acknowledges in batches.

Real Redis throughout: the shared server for a live worker sending real letters to the aiosmtpd
test server, a private redis-server for the connection that breaks and comes back.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from dramatiq import Message

from dispatcher.ledger.models import State
from dispatcher.queue.actors import ACTOR, QUEUE
from dispatcher.queue.broker import make_broker
from dispatcher.queue.consumer import BatchingConsumer
from tests.conftest import Running, email_letters, enqueue, wait_for
from tests.support.services import RedisServer
from tests.support.workers import message_ids, planned_message_id

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def ack_set(broker: Any) -> str:
    return f"{broker.namespace}:__acks__.{broker.broker_id}.{QUEUE}"


def messages_hash(broker: Any) -> str:
    return f"{broker.namespace}:{QUEUE}.msgs"


def put(broker: Any, n: int) -> list[str]:
    """``n`` messages on the queue, as the enqueuer writes them; their delivery ids."""
    ids = [f"dl_test{i:04d}" for i in range(n)]
    for delivery_id in ids:
        broker.enqueue(Message(queue_name=QUEUE, actor_name=ACTOR, args=(delivery_id,), kwargs={}, options={}))
    return ids


def consumer_over(settings: Any, messages: int) -> tuple[Any, BatchingConsumer]:
    """A broker on the shared Redis with ``messages`` on its queue, and a consumer of it (prefetch
    8, as a worker of 4 threads has)."""
    broker = make_broker(settings)
    broker.declare_queue(QUEUE)
    put(broker, messages)
    consumer = broker.consume(QUEUE, prefetch=8, timeout=100)
    assert isinstance(consumer, BatchingConsumer)
    return broker, consumer


def take(consumer: BatchingConsumer, n: int) -> list[Any]:
    taken: list[Any] = []
    while len(taken) < n:
        message = next(consumer)
        if message is not None:
            taken.append(message)
    return taken


def test_a_worker_sends_every_letter_once_fetching_several_messages_per_call_and_leaves_no_ack_behind(service, smtp):
    letters = email_letters(service, 40)
    broker = service.broker
    broker.declare_queue(QUEUE)
    fetched: list[int] = []
    fetch = broker.do_fetch

    def counting_fetch(queue_name: str, count: int) -> list[bytes]:
        found = fetch(queue_name, count)
        if found and queue_name == QUEUE:
            fetched.append(len(found))
        return found

    broker.do_fetch = counting_fetch
    enqueue(service, letters)
    with Running(service, threads=4):
        wait_for(lambda: all(service.ledger.views.state_of(d) == State.SENT for d in letters), timeout=60)
        # acknowledged while the worker still runs, not only when it stops
        wait_for(lambda: broker.client.scard(ack_set(broker)) == 0, timeout=5)
        assert broker.client.hlen(messages_hash(broker)) == 0

    assert message_ids(smtp) == Counter({planned_message_id(service, d): 1 for d in letters})
    assert sum(fetched) == len(letters)
    # prefetch 8 (2 × 4 threads), topped up once half is used: about 4 a call, never 1 by 1
    assert len(fetched) <= len(letters) / 2, fetched


def test_acks_pending_when_redis_went_away_are_sent_by_the_consumer_built_after_it_came_back(tmp_path, settings):
    with RedisServer(appendonly=True) as private:
        broker = make_broker(replace(settings, redis_url=private.url))
        broker.declare_queue(QUEUE)
        put(broker, 3)
        consumer = broker.consume(QUEUE, prefetch=8, timeout=100)
        assert isinstance(consumer, BatchingConsumer)
        taken = take(consumer, 3)
        for message in taken:
            consumer.ack(message)
        assert broker.client.scard(ack_set(broker)) == 3  # batched: not sent yet

        private.stop()
        with pytest.raises(Exception) as raised:  # dramatiq's ConnectionClosed, as its own consumer
            next(consumer)
        assert "ConnectionClosed" in type(raised.value).__name__
        consumer.close()  # what dramatiq does before building a new consumer; Redis still away
        private.start()

        after = broker.consume(QUEUE, prefetch=8, timeout=100)
        assert next(after) is None  # nothing left to fetch; the acks went first
        assert broker.client.scard(ack_set(broker)) == 0
        assert broker.client.hlen(messages_hash(broker)) == 0


def test_an_idle_consumer_sends_its_pending_acks_on_its_next_poll(settings, redis_server):
    broker, consumer = consumer_over(settings, 2)
    for message in take(consumer, 2):
        consumer.ack(message)
    assert broker.client.scard(ack_set(broker)) == 2
    assert next(consumer) is None  # the queue is empty
    assert broker.client.scard(ack_set(broker)) == 0
    assert broker.client.hlen(messages_hash(broker)) == 0


def test_a_consumer_whose_thread_stopped_acknowledges_at_once(settings, redis_server):
    broker, consumer = consumer_over(settings, 2)
    first, second = take(consumer, 2)
    consumer.ack(first)
    consumer.stop_batching()  # what the worker's shutdown does when the consumer thread stops
    assert broker.client.scard(ack_set(broker)) == 1
    consumer.ack(second)
    assert broker.client.scard(ack_set(broker)) == 0


def test_a_full_consumer_waits_for_an_ack_rather_than_fetching_one_by_one(settings, redis_server):
    broker, consumer = consumer_over(settings, 12)
    taken = take(consumer, 8)  # one fetch of 8
    assert broker.client.llen(f"{broker.namespace}:{QUEUE}") == 4
    for message in taken[:3]:
        consumer.ack(message)
    assert next(consumer) is None  # 5 in hand, more than half of 8: no fetch
    assert broker.client.llen(f"{broker.namespace}:{QUEUE}") == 4
    assert broker.client.scard(ack_set(broker)) == 5  # but its acks went out meanwhile
    consumer.ack(taken[3])
    more = take(consumer, 4)  # 4 in hand: topped up with the 4 left
    assert len({m.message_id for m in taken + more}) == 12
    assert broker.client.llen(f"{broker.namespace}:{QUEUE}") == 0
