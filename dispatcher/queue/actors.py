"""The deliver actor, and the enqueuer that intake and the reconciler use to reach it.

The enqueuer builds messages by actor name, so the API process never imports the worker's
sending code; the worker declares the actor with its processing function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import dramatiq
from dramatiq import Broker, Message

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
    """The queue refused a message; ``sent`` are the ids that made it before it did."""

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

        Raises EnqueueFailed at the first failure, naming what was sent before it: callers put
        the rest back to planned in the ledger, and the reconciler sends them later.
        """
        sent: list[str] = []
        for delivery_id in delivery_ids:
            try:
                self.broker.enqueue(
                    Message(queue_name=QUEUE, actor_name=ACTOR, args=(delivery_id,), kwargs={}, options={})
                )
            except Exception as exc:
                raise EnqueueFailed(sent, exc) from exc
            sent.append(delivery_id)
        return sent
