"""What is read at scrape time rather than counted: the ledger's letters by channel, section and
state (so the numbers are the ledger's, exactly), how long the most overdue letter has waited,
dead letters, paused channels, flagged recipients; and the queue in Redis (messages waiting, the
oldest one's age, dead messages, live workers).

Both answer a scrape with one round trip or one read-only transaction, never per letter. A part
that cannot be read says so (``dispatch_ledger_up`` / ``dispatch_queue_up`` 0) instead of failing
the whole scrape: the API's own counters still come through.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from datetime import datetime

import redis
from dramatiq import Message
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from dispatcher.config.catalog import Catalog
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.stats import Stats
from dispatcher.logging import get_logger
from dispatcher.queue.actors import QUEUE
from dispatcher.queue.liveness import registry_key, worker_key

log = get_logger("dispatcher.metrics")


def channel_keys(catalog: Catalog) -> frozenset[str]:
    """``channel:section`` for every channel a configured section writes through: the keys a
    pause can hold, each shown as 0 or 1."""
    keys: set[str] = set()
    for section in catalog.sections.values():
        for campaign_id in section.campaigns:
            if campaign_id in catalog.campaigns:
                keys.update(f"{route.channel}:{section.code}" for route in catalog.routes(campaign_id, section.code))
    return frozenset(keys)


class LedgerCollector(Collector):
    def __init__(self, stats: Stats, *, channel_keys: Collection[str] = (), clock: Callable[[], datetime] = utcnow):
        self.stats = stats
        self.channel_keys = channel_keys
        self.clock = clock

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; collect() runs a query, only when scraped

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("dispatch_ledger_up", "1 if the ledger answered this scrape's query.")
        took = GaugeMetricFamily("dispatch_ledger_scrape_duration_seconds", "Seconds the ledger's query took.")
        started = time.perf_counter()
        now = self.clock()
        try:
            snap = self.stats.snapshot(now)
        except Exception as exc:  # noqa: BLE001 - the scrape goes on without the ledger's numbers
            log.warning("metrics.ledger_unreadable", error=type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        took.add_metric([], time.perf_counter() - started)
        yield up
        yield took

        letters = GaugeMetricFamily(
            "dispatch_letters",
            "Letters (deliveries, digests included) in the ledger by channel, section and state, read at scrape time.",
            labels=["channel", "section", "state"],
        )
        for c in snap.letters:
            letters.add_metric([c.channel, c.section, c.state], c.count)
        yield letters

        due = GaugeMetricFamily(
            "dispatch_letters_due",
            "Letters planned or queued whose time has come (not held for later by a backoff, caps or office "
            "hours), by channel.",
            labels=["channel"],
        )
        oldest_due = GaugeMetricFamily(
            "dispatch_letters_due_oldest_age_seconds",
            "Seconds since the most overdue waiting letter became due, by channel (0: none is due).",
            labels=["channel"],
        )
        oldest_queued = GaugeMetricFamily(
            "dispatch_letters_queued_oldest_age_seconds",
            "Seconds the longest-queued letter has been on the queue unclaimed, by channel (0: none is queued).",
            labels=["channel"],
        )
        for channel, w in sorted(snap.waiting.items()):
            due.add_metric([channel], w.due)
            oldest_due.add_metric([channel], _age(now, w.oldest_due_at))
            oldest_queued.add_metric([channel], _age(now, w.oldest_queued_at))
        yield due
        yield oldest_due
        yield oldest_queued

        yield GaugeMetricFamily(
            "dispatch_dead_letters",
            "Dead letters recorded in the ledger (queue messages whose actor crashed on every retry).",
            value=snap.dead_letters,
        )
        paused = GaugeMetricFamily(
            "dispatch_channel_paused",
            "1 while a section's channel is paused by an operational failure (`dispatcher channel resume`).",
            labels=["channel", "section"],
        )
        for key in sorted(set(self.channel_keys) | snap.paused):
            channel, _, section = key.partition(":")
            paused.add_metric([channel, section], 1 if key in snap.paused else 0)
        yield paused
        yield GaugeMetricFamily(
            "dispatch_flagged_recipients",
            "Recipients flagged for an operator (a fax number without a fax tone); their letters wait.",
            value=snap.flagged_recipients,
        )


def _age(now: datetime, since: datetime | None) -> float:
    return 0.0 if since is None else max(0.0, (now - since).total_seconds())


class QueueCollector(Collector):
    """The deliveries queue as dramatiq keeps it in Redis (queue/broker.py, queue/deadletters.py)."""

    def __init__(
        self, client: redis.Redis, namespace: str, *, queue: str = QUEUE, clock: Callable[[], float] = time.time
    ):
        self.client = client
        self.namespace = namespace
        self.queue = queue
        self.clock = clock

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("dispatch_queue_up", "1 if Redis answered this scrape.")
        key = f"{self.namespace}:{self.queue}"
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.llen(key)
            pipe.hlen(f"{key}.msgs")
            pipe.hlen(f"{key}.DQ.msgs")
            pipe.zcard(f"{key}.XQ")
            pipe.lindex(key, 0)
            pipe.smembers(registry_key(self.namespace))
            waiting, stored, delayed, dead, head, workers = pipe.execute()
            oldest = self._age_of(key, head)
            alive = self._alive(workers)
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics.queue_unreadable", error=type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        labels = ["queue"]

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, text, labels=labels)
            family.add_metric([self.queue], value)
            return family

        yield gauge("dispatch_queue_messages", "Messages waiting on the queue for a worker.", waiting)
        yield gauge(
            "dispatch_queue_unacked_messages",
            "Messages fetched by workers and not yet acknowledged (being sent, or prefetched).",
            max(0, stored - waiting),
        )
        yield gauge("dispatch_queue_delayed_messages", "Messages waiting out dramatiq's retry backoff.", delayed)
        yield gauge(
            "dispatch_queue_dead_messages", "Messages in the queue's dead-letter set in Redis (kept 30 days).", dead
        )
        yield gauge(
            "dispatch_queue_oldest_message_age_seconds",
            "Seconds since the message at the head of the queue was enqueued (0: the queue is empty).",
            oldest,
        )
        yield GaugeMetricFamily(
            "dispatch_workers_alive", "Worker processes whose liveness key is set in Redis.", value=alive
        )

    def _age_of(self, key: str, head: bytes | None) -> float:
        if head is None:
            return 0.0
        data = self.client.hget(f"{key}.msgs", head)
        if data is None:
            return 0.0  # taken between the two reads
        try:
            enqueued_ms = Message.decode(data if isinstance(data, bytes) else data.encode()).message_timestamp
        except Exception:  # noqa: BLE001 - a message we cannot read has no age to show
            return 0.0
        return max(0.0, self.clock() - enqueued_ms / 1000.0)

    def _alive(self, workers: set[bytes]) -> int:
        if not workers:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for worker in workers:
            pipe.exists(worker_key(self.namespace, worker.decode()))
        return sum(1 for found in pipe.execute() if found)
