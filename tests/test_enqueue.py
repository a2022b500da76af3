"""The enqueuer: an appeal's letters go to Redis in one round trip, as messages that look exactly
like the ones dramatiq's own ``broker.enqueue`` writes, and that a real dramatiq worker runs."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Broker, Message, Middleware, Worker
from dramatiq.brokers.redis import RedisBroker

from dispatcher.queue.actors import ACTOR, QUEUE, EnqueueFailed, Enqueuer
from dispatcher.queue.broker import make_broker
from dispatcher.settings import Settings
from tests.conftest import wait_for
from tests.support.services import RedisServer, free_port


def broker_on(url: str) -> RedisBroker:
    settings = Settings(
        config_dir=Path("config"),
        templates_dir=Path("templates"),
        var_dir=Path("var"),
        database_url="sqlite://",
        redis_url=url,
        redis_namespace=f"enq-{secrets.token_hex(4)}",
    )
    return make_broker(settings)


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[RedisBroker]:
    broker = broker_on(redis_server.url)
    yield broker
    broker.close()


def stored(broker: RedisBroker) -> list[dict[str, Any]]:
    """The queue's messages as Redis holds them, in queue order."""
    client = broker.client
    ids = client.lrange(f"{broker.namespace}:{QUEUE}", 0, -1)
    bodies = client.hmget(f"{broker.namespace}:{QUEUE}.msgs", ids)
    return [Message.decode(bytes(body)).asdict() for body in bodies]


def test_letters_sent_together_look_in_redis_like_dramatiqs_own(broker: RedisBroker) -> None:
    enqueuer = Enqueuer(broker)
    enqueuer.broker.enqueue(Message(queue_name=QUEUE, actor_name=ACTOR, args=("dl_one",), kwargs={}, options={}))
    assert enqueuer.send(["dl_two", "dl_three", "dl_four"]) == ["dl_two", "dl_three", "dl_four"]

    messages = stored(broker)
    assert [tuple(m["args"]) for m in messages] == [("dl_one",), ("dl_two",), ("dl_three",), ("dl_four",)]
    # the same shape in every field but the ids and times
    shapes = [{k: v for k, v in m.items() if k not in ("args", "message_id", "message_timestamp")} for m in messages]
    assert all(shape["options"].keys() == {"redis_message_id"} for shape in shapes)
    assert len({m["options"]["redis_message_id"] for m in messages}) == 4
    for shape in shapes:
        shape["options"] = {}
    assert shapes[1:] == [shapes[0]] * 3


def test_a_real_dramatiq_worker_runs_letters_sent_together(redis_server: RedisServer) -> None:
    broker = broker_on(redis_server.url)
    ran: list[str] = []
    lock = threading.Lock()

    def deliver(delivery_id: str) -> None:
        with lock:
            ran.append(delivery_id)

    dramatiq.actor(broker=broker, actor_name=ACTOR, queue_name=QUEUE)(deliver)
    ids = [f"dl_{i}" for i in range(25)]
    Enqueuer(broker).send(ids)
    worker = Worker(broker, worker_threads=2)
    worker.start()
    try:
        wait_for(lambda: len(ran) == len(ids), timeout=20)
    finally:
        worker.stop()
        broker.close()
    assert sorted(ran) == sorted(ids)


def test_a_middleware_that_watches_enqueues_sees_each_letter(broker: RedisBroker) -> None:
    seen: list[tuple[str, str]] = []

    class Watching(Middleware):
        def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
            seen.append(("before", message.args[0]))

        def after_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
            seen.append(("after", message.args[0]))

    broker.add_middleware(Watching())
    Enqueuer(broker).send(["dl_a", "dl_b"])
    assert seen == [("before", "dl_a"), ("before", "dl_b"), ("after", "dl_a"), ("after", "dl_b")]


def test_a_queue_that_is_down_names_nothing_as_sent() -> None:
    broker = broker_on(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    enqueuer = Enqueuer(broker)  # declaring the queue needs no Redis; sending does
    with pytest.raises(EnqueueFailed) as caught:
        enqueuer.send(["dl_x", "dl_y"])
    assert caught.value.sent == []
    assert isinstance(caught.value.cause, redis.ConnectionError)
