"""The dramatiq Redis broker, with settings chosen for letters rather than for dramatiq's defaults.

dramatiq's defaults keep a killed worker's unacknowledged messages for a long time: a worker
counts as dead only after 60 s without a heartbeat, and the requeue of its messages happens
during "maintenance", which runs on 1,000 in a million broker commands — on a quiet queue
polled once a second that is a quarter of an hour on average. Dead-lettered messages are
deleted after 7 days. Our choices:

* ``HEARTBEAT_TIMEOUT_MS`` = 20 s: a worker blocked longer than that has its messages handed to
  others; a duplicate message is harmless because the ledger claim lets one through.
* ``MAINTENANCE_CHANCE`` = 50,000 per million (5 %): maintenance runs about every 20 commands,
  so with one idle worker polling each second a dead worker's messages return within about
  20 s of the heartbeat timeout, i.e. well within a minute.
* ``DEAD_MESSAGE_TTL_MS`` = 30 days: longer than any campaign's sending window, so that a dead
  letter is still in Redis when an operator looks; the ledger keeps the delivery either way, and
  records the dead letter itself within seconds (``queue/deadletters.py``: the worker's middleware,
  else the reconciler's sweep of the dead-letter queue every housekeeping run).

Its consumer fetches and acknowledges in batches (``queue/consumer.py``).
"""

from __future__ import annotations

import redis
from dramatiq.brokers.redis import RedisBroker

from dispatcher.queue.consumer import BatchingRedisBroker
from dispatcher.settings import Settings

HEARTBEAT_TIMEOUT_MS = 20_000
MAINTENANCE_CHANCE = 50_000
DEAD_MESSAGE_TTL_MS = 30 * 24 * 3600 * 1000


def make_broker(settings: Settings) -> RedisBroker:
    # Short socket timeouts: intake must notice a dead Redis quickly and fall back to the
    # ledger outbox instead of hanging a web form's request.
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2,
        socket_timeout=10,
        health_check_interval=30,
    )
    return BatchingRedisBroker(
        client=client,
        namespace=settings.redis_namespace,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
        maintenance_chance=MAINTENANCE_CHANCE,
        dead_message_ttl=DEAD_MESSAGE_TTL_MS,
    )
