"""The queue's state as operators read it (the console's overview): what waits on the queue and
since when, the dead-letter queue, the workers alive, and which reconciler holds the lease and
when it last ticked. Read-only; one short pipeline of Redis reads.

Keys read (see broker.py, liveness.py, leader.py, deadletters.py): dramatiq's queue list
``<ns>:deliveries`` (oldest message first) and its messages ``<ns>:deliveries.msgs``, its delay
queue ``<ns>:deliveries.DQ``, its dead-letter set ``<ns>:deliveries.XQ``; the workers' set
``<ns>:workers`` and their keys ``<ns>:worker:<id>``; the lease ``<ns>:reconciler:lease`` and
``<ns>:reconciler:last_tick``, which the lease holder sets every tick.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from dramatiq import Message

from dispatcher.queue.actors import QUEUE
from dispatcher.queue.liveness import registry_key, worker_key


def lease_key(namespace: str) -> str:
    return f"{namespace}:reconciler:lease"


def last_tick_key(namespace: str) -> str:
    return f"{namespace}:reconciler:last_tick"


@dataclass(frozen=True)
class QueueStatus:
    #: messages waiting on the queue for a worker
    depth: int = 0
    #: messages held back by dramatiq itself (its retries of a crashed actor)
    delayed: int = 0
    #: when the oldest waiting message was put on the queue
    oldest_at: datetime | None = None
    #: dead-lettered messages still in Redis
    dead_in_redis: int = 0
    #: workers whose liveness key is set
    workers_alive: tuple[str, ...] = ()
    #: the reconciler holding the lease (None: none holds it: no reconciler runs)
    reconciler: str | None = None
    reconciler_tick: datetime | None = None
    #: why nothing could be read (Redis away); the other fields are then empty
    error: str | None = None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def queue_status(client: redis.Redis, namespace: str) -> QueueStatus:
    queue = f"{namespace}:{QUEUE}"
    try:
        pipe = client.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.llen(f"{queue}.DQ")
        pipe.lindex(queue, 0)
        pipe.zcard(f"{queue}.XQ")
        pipe.smembers(registry_key(namespace))
        pipe.get(lease_key(namespace))
        pipe.get(last_tick_key(namespace))
        depth, delayed, oldest_id, dead, registered, holder, tick = pipe.execute()
        oldest_at = None
        if oldest_id is not None:
            data = client.hget(f"{queue}.msgs", oldest_id)
            if data is not None:
                raw = data if isinstance(data, bytes) else str(data).encode()
                oldest_at = datetime.fromtimestamp(Message.decode(raw).message_timestamp / 1000, UTC)
        workers = sorted(w for w in (_text(x) for x in registered) if w is not None)
        pipe = client.pipeline(transaction=False)
        for worker in workers:
            pipe.exists(worker_key(namespace, worker))
        alive = tuple(w for w, there in zip(workers, pipe.execute(), strict=True) if there)
    except redis.RedisError as exc:
        return QueueStatus(error=f"Redis does not answer ({type(exc).__name__})")
    tick_at = None
    tick_text = _text(tick)
    if tick_text:
        try:
            tick_at = datetime.fromisoformat(json.loads(tick_text)["at"])
        except (ValueError, KeyError, TypeError):
            tick_at = None
    return QueueStatus(
        depth=int(depth),
        delayed=int(delayed),
        oldest_at=oldest_at,
        dead_in_redis=int(dead),
        workers_alive=alive,
        reconciler=_text(holder),
        reconciler_tick=tick_at,
    )
