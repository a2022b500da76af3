"""The deliver actor, and the enqueuer that intake and the reconciler use to reach it.

The enqueuer builds messages by actor name, so the API process never imports the worker's
sending code; the worker declares the actor with its processing function.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any
from uuid import uuid4

import dramatiq
from dramatiq import Broker, Message
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from dispatcher.errors import DispatchError

QUEUE = "deliveries"
ACTOR = "deliver"
#: dramatiq's own retries cover crashes of the actor itself (a database blip); sending
#: failures are recorded in the ledger and retried from there, not through these.
MAX_RETRIES = 3
#: longer than any single send may take (fax calls run minutes); the stale-claim timeout of the
#: reconciler must stay above it.
TIME_LIMIT_MS = 10 * 60 * 1000


def declare_deliver(broker: Broker, process: Callable[[str], None]) -> dramatiq.Actor:
    return dramatiq.actor(
        broker=broker,
        actor_name=ACTOR,
        queue_name=QUEUE,
        max_retries=MAX_RETRIES,
        min_backoff=1_000,
        max_backoff=30_000,
        time_limit=TIME_LIMIT_MS,
    )(process)


class EnqueueFailed(DispatchError):
    """The queue refused messages; ``sent`` are the ids known to be on the queue (others may be
    too: a duplicate message is harmless, the ledger's claim lets one through)."""

    def __init__(self, sent: list[str], cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.sent = sent
        self.cause = cause


class Enqueuer:
    def __init__(self, broker: Broker):
        self.broker = broker
        broker.declare_queue(QUEUE)

    def send(self, delivery_ids: Iterable[str]) -> list[str]:
        """Put one message per delivery on the queue; returns the ids sent.

        Raises EnqueueFailed naming what is known to be on the queue: callers put the rest back
        to planned in the ledger, and the reconciler sends them later.
        """
        ids = list(delivery_ids)
        if isinstance(self.broker, RedisBroker):
            return pipelined(self.broker, ids)
        sent: list[str] = []
        for delivery_id in ids:
            message: Message[Any] = Message(
                queue_name=QUEUE, actor_name=ACTOR, args=(delivery_id,), kwargs={}, options={}
            )
            try:
                self.broker.enqueue(message)
            except Exception as exc:
                raise EnqueueFailed(sent, exc) from exc
            sent.append(delivery_id)
        return sent


def pipelined(broker: RedisBroker, ids: list[str]) -> list[str]:
    """What ``RedisBroker.enqueue`` does for each message, for all of them in one MULTI/EXEC
    (one round trip; a connection lost before EXEC leaves none), two commands whatever their
    number.

    An appeal's five letters, one at a time, cost five round trips and dramatiq's dispatch
    script five times, which was a fifth of the API's CPU under load (bench/intake.py). The
    script's enqueue is ``HSET <ns>:<queue>.msgs <id> <data>`` and ``RPUSH <ns>:<queue> <id>``
    (dramatiq 2.x's dispatch.lua; pinned in pyproject.toml); what it does besides on every
    call (a heartbeat for the caller, a random maintenance pass) concerns consumers, and the
    workers' own fetches do it. tests/test_enqueue.py checks that messages sent this way look in
    Redis exactly like those sent by ``broker.enqueue`` and that a real dramatiq worker runs them.
    """
    if not ids:
        return []
    before = _hooked(broker, "before_enqueue")
    after = _hooked(broker, "after_enqueue")
    fields: dict[str, bytes] = {}
    copies = []
    if before or after:
        for delivery_id in ids:
            # a Redis id of its own per enqueue, as RedisBroker.enqueue gives (a message may be
            # enqueued again: a retry, a hand back)
            copy: Message[Any] = Message(
                queue_name=QUEUE,
                actor_name=ACTOR,
                args=(delivery_id,),
                kwargs={},
                options={"redis_message_id": str(uuid4())},
            )
            if before:
                broker.emit_before("enqueue", copy, None)
            copies.append(copy)
            fields[copy.options["redis_message_id"]] = copy.encode()
    else:
        # The same fields Message.encode writes, in its order, without a Message (its copy and
        # dataclass walk were most of an enqueue's CPU); the configured encoder all the same.
        encode = dramatiq.get_encoder().encode
        timestamp = int(time.time() * 1000)
        for delivery_id in ids:
            redis_id = str(uuid4())
            fields[redis_id] = encode(
                {
                    "queue_name": QUEUE,
                    "actor_name": ACTOR,
                    "args": [delivery_id],
                    "kwargs": {},
                    "options": {"redis_message_id": redis_id},
                    "message_id": str(uuid4()),
                    "message_timestamp": timestamp,
                }
            )
    queue = f"{broker.namespace}:{QUEUE}"
    pipe = broker.client.pipeline(transaction=True)
    pipe.hset(f"{queue}.msgs", mapping=fields)  # type: ignore[arg-type]
    pipe.rpush(queue, *fields)
    try:
        pipe.execute()
    except Exception as exc:
        # none of them is on the queue, or (the answer to EXEC lost) all are: a duplicate
        # message is harmless, the ledger's claim lets one through
        raise EnqueueFailed([], exc) from exc
    if after:
        for copy in copies:
            broker.emit_after("enqueue", copy, None)
    return ids


def _hooked(broker: Broker, hook: str) -> bool:
    """Whether a middleware of ``broker`` does something on ``hook`` (none of dramatiq's
    defaults does on enqueue: calling each for each message costs for nothing)."""
    return any(getattr(type(m), hook) is not getattr(Middleware, hook) for m in broker.middleware)
