"""Queue messages stranded in a *live* worker's dramatiq ack set, put back on their queue.

dramatiq's Redis broker fetches with a Lua script that moves up to ``prefetch`` message ids from
the queue into the broker's ack set (``<ns>:__acks__.<broker id>.<queue>``) and returns their
data. If the connection breaks after Redis ran the script and before its reply reached the
worker, the worker never sees those messages, yet they sit in its ack set. A Redis shutdown does
exactly that: it can execute a command it will never answer (the script's effect is in the AOF,
the reply is not written). The worker's consumer thread then logs "Consumer encountered a
connection error", builds a new consumer and carries on with the same broker id and heartbeat,
and dramatiq's maintenance requeues only the ack sets of brokers whose heartbeat stopped. The
same consumer thread also drops its in-memory delay queue on a connection error, whose messages
stay in the ``.DQ`` ack set. Nothing brings such a message back while the worker lives; the ledger
noticed only after ``requeue_after`` (15 minutes) of the letter sitting in ``queued``.

:class:`StrandedMessages` looks at every ack set of the namespace's brokers, remembers when it
first saw each message there, and pushes back to the head of its queue any message seen there
for ``after`` or longer whose delivery is not being sent (``sending``: a worker holds it). A
message a live worker does still hold in memory (its threads all busy for that long) is pushed
back too: then two messages name one delivery, and the ledger's claim lets only one of them send
(the other is skipped, as any redelivered message is). The move is one Lua script per ack set:
removed from the set, pushed only if its data is still there, so a message acknowledged in
between is not revived, and the later ack of a message moved away is a no-op in dramatiq's script.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from dramatiq import Message
from dramatiq.common import dq_name

from dispatcher.ledger.models import State
from dispatcher.logging import get_logger
from dispatcher.queue.actors import ACTOR, QUEUE

log = get_logger("dispatcher.reconciler")

#: KEYS: ack set, queue list, messages hash; ARGV: message ids. Returns the ids pushed back.
_REQUEUE = """
local pushed = {}
for i = 1, #ARGV do
    if redis.call("srem", KEYS[1], ARGV[i]) == 1 then
        if redis.call("hexists", KEYS[3], ARGV[i]) == 1 then
            redis.call("lpush", KEYS[2], ARGV[i])
            table.insert(pushed, ARGV[i])
        end
    end
end
return pushed
"""


class StrandedMessages:
    def __init__(
        self,
        client: Any,
        namespace: str,
        state_of: Callable[[str], str | None],
        *,
        after: timedelta,
        queues: Iterable[str] = (QUEUE, dq_name(QUEUE)),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.namespace = namespace
        self.state_of = state_of
        self.after = after.total_seconds()
        self.queues = tuple(queues)
        self.clock = clock
        self._requeue = client.register_script(_REQUEUE)
        #: (ack set key, message id) → when first seen there
        self._seen: dict[tuple[str, str], float] = {}
        #: messages pushed back since start (for metrics and the chaos runs)
        self.requeued = 0

    @classmethod
    def for_broker(
        cls, broker: Any, state_of: Callable[[str], str | None], *, after: timedelta
    ) -> StrandedMessages | None:
        """For a dramatiq RedisBroker; None for any other broker (tests' stubs)."""
        from dramatiq.brokers.redis import RedisBroker

        if not isinstance(broker, RedisBroker):
            return None
        return cls(broker.client, broker.namespace, state_of, after=after)

    def sweep(self) -> list[str]:
        """One look at the ack sets; returns the deliveries whose message was pushed back."""
        now = self.clock()
        ns = self.namespace
        brokers = [b.decode() for b in self.client.zrange(f"{ns}:__heartbeats__", 0, -1)]
        keys = [(f"{ns}:__acks__.{broker}.{queue}", broker, queue) for broker in brokers for queue in self.queues]
        pipe = self.client.pipeline(transaction=False)
        for key, _, _ in keys:
            pipe.smembers(key)
        seen: dict[tuple[str, str], float] = {}
        due: dict[tuple[str, str, str], list[str]] = {}
        for (key, broker, queue), members in zip(keys, pipe.execute(), strict=True):
            for raw in members:
                message_id = raw.decode()
                first = self._seen.get((key, message_id), now)
                seen[(key, message_id)] = first
                if now - first >= self.after:
                    due.setdefault((key, broker, queue), []).append(message_id)
        self._seen = seen
        requeued: list[str] = []
        for (key, broker, queue), message_ids in due.items():
            messages_key = f"{ns}:{queue}.msgs"
            back: dict[str, str | None] = {}
            for message_id, data in zip(message_ids, self.client.hmget(messages_key, message_ids), strict=True):
                delivery = _delivery_of(data)
                if delivery is not None and self.state_of(delivery) == State.SENDING:
                    continue  # a worker is sending it (or its claim will go stale and come back that way)
                back[message_id] = delivery
            if not back:
                continue
            pushed = [p.decode() for p in self._requeue(keys=[key, f"{ns}:{queue}", messages_key], args=list(back))]
            for message_id in back:
                self._seen.pop((key, message_id), None)
            if pushed:
                deliveries = [d for d in (back[p] for p in pushed) if d is not None]
                self.requeued += len(pushed)
                requeued += deliveries
                log.warning(
                    "queue.stranded_messages_requeued",
                    broker=broker,
                    queue=queue,
                    messages=len(pushed),
                    deliveries=deliveries,
                    in_ack_set_for_s=f">= {self.after:.0f}",
                )
        return requeued


def _delivery_of(data: bytes | None) -> str | None:
    """The delivery id a deliver message names; None if it has no data or is another actor's."""
    if data is None:
        return None
    try:
        message = Message.decode(data)
    except Exception:  # noqa: BLE001 - unreadable: pushed back like any other, dramatiq will say why
        return None
    if message.actor_name != ACTOR or not message.args:
        return None
    return str(message.args[0])
