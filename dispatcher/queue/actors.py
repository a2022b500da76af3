"""The deliver actor, and the enqueuer that intake and the reconciler use to reach it.

The enqueuer builds messages by actor name, so the API process never imports the worker's
sending code; the worker declares the actor with its processing function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from uuid import uuid4

import dramatiq
from dramatiq import Broker, Message
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from redis.exceptions import NoScriptError

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
        messages: list[Message[Any]] = [
            Message(queue_name=QUEUE, actor_name=ACTOR, args=(i,), kwargs={}, options={}) for i in ids
        ]
        if isinstance(self.broker, RedisBroker) and len(ids) > 1:
            return pipelined(self.broker, ids, messages)
        sent: list[str] = []
        for delivery_id, message in zip(ids, messages, strict=True):
            try:
                self.broker.enqueue(message)
            except Exception as exc:
                raise EnqueueFailed(sent, exc) from exc
            sent.append(delivery_id)
        return sent


def pipelined(broker: RedisBroker, ids: list[str], messages: list[Message[Any]]) -> list[str]:
    """What ``RedisBroker.enqueue`` does for each message, in one round trip to Redis.

    An appeal's five letters, one at a time, cost five round trips and most of intake's Redis
    time (bench/intake.py). The script, its arguments and the middleware hooks are dramatiq's
    own (``RedisBroker.enqueue`` and ``_dispatch`` in dramatiq 2.x, pinned in pyproject.toml);
    tests/test_enqueue.py checks that a message sent this way looks in Redis exactly like one
    sent by ``broker.enqueue`` and that a real dramatiq worker runs it."""
    copies = []
    for message in messages:
        # a Redis id of its own per enqueue, as RedisBroker.enqueue gives (a message may be
        # enqueued again: a retry, a hand back)
        copy = message.copy(options={"redis_message_id": str(uuid4())})
        broker.emit_before("enqueue", copy, None)
        copies.append(copy)
    try:
        answers = _dispatch_all(broker, copies)
        if any(isinstance(a, NoScriptError) for a in answers):
            # a Redis that restarted since the script was loaded: NOSCRIPT means not run
            script = broker.scripts["dispatch"]
            script.registered_client.script_load(script.script)
            again = [i for i, a in enumerate(answers) if isinstance(a, NoScriptError)]
            for i, answer in zip(again, _dispatch_all(broker, [copies[i] for i in again]), strict=True):
                answers[i] = answer
    except Exception as exc:
        # the connection failed mid-way: which messages Redis took is unknown
        raise EnqueueFailed([], exc) from exc
    sent: list[str] = []
    failed: BaseException | None = None
    for delivery_id, copy, answer in zip(ids, copies, answers, strict=True):
        if isinstance(answer, BaseException):
            failed = failed or answer
            continue
        broker.emit_after("enqueue", copy, None)
        sent.append(delivery_id)
    if failed is not None:
        raise EnqueueFailed(sent, failed) from failed
    return sent


def _dispatch_all(broker: RedisBroker, copies: list[Message[Any]]) -> list[Any]:
    """One EVALSHA of dramatiq's dispatch script per message, pipelined; the answers, errors
    included (not raised)."""
    sha = broker.scripts["dispatch"].sha
    pipe = broker.client.pipeline(transaction=False)
    for copy in copies:
        pipe.evalsha(
            sha,
            1,
            broker.namespace,
            "enqueue",
            current_millis(),
            QUEUE,
            broker.broker_id,
            broker.heartbeat_timeout,
            broker.dead_message_ttl,
            broker._should_do_maintenance("enqueue"),
            broker._max_unpack_size(),
            copy.options["redis_message_id"],
            copy.encode(),
        )
    return list(pipe.execute(raise_on_error=False))
