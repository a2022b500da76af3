"""The reconciler: the loop that keeps the ledger and the queue in agreement.

Each tick it sends to the queue every delivery that is due and not on it: new appeals whose
immediate enqueue failed (Redis was down), retries whose backoff ran out, and queued letters
whose message was lost. Less often it takes back claims that went stale (a worker died
mid-send), expires letters whose campaign deadline passed, and purges personal data whose
retention ran out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from dispatcher.config.catalog import Catalog
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.store import Ledger
from dispatcher.logging import get_logger
from dispatcher.queue.actors import TIME_LIMIT_MS, EnqueueFailed, Enqueuer
from dispatcher.queue.strays import StrandedMessages
from dispatcher.settings import Settings

log = get_logger("dispatcher.reconciler")


@dataclass
class ReconcilerConfig:
    #: seconds between ticks
    interval: float = 1.0
    #: a new delivery is left to intake's own enqueue for this long
    fresh_grace: timedelta = timedelta(seconds=5)
    #: a queued delivery nobody claimed for this long gets a new message
    requeue_after: timedelta = timedelta(minutes=15)
    #: a claim older than this is taken back; above the actor's time limit so a slow send
    #: is never taken from a live worker
    stale_claim_after: timedelta = field(default_factory=lambda: timedelta(milliseconds=TIME_LIMIT_MS + 60_000))
    #: seconds between housekeeping runs (stale claims, deadlines, retention, stranded messages)
    housekeeping_every: float = 30.0
    #: a message in a worker's dramatiq ack set this long, its letter not being sent, is put
    #: back on the queue (stranded by a Redis restart: dispatcher/queue/strays.py)
    stranded_after: timedelta = timedelta(minutes=2)
    batch: int = 1000


class Reconciler:
    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        ledger: Ledger,
        enqueuer: Enqueuer,
        config: ReconcilerConfig | None = None,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.settings = settings
        self.catalog = catalog
        self.ledger = ledger
        self.enqueuer = enqueuer
        self.config = config or ReconcilerConfig()
        self.clock = clock
        self._last_housekeeping: datetime | None = None
        self.strays = StrandedMessages.for_broker(
            getattr(enqueuer, "broker", None), ledger.state_of, after=self.config.stranded_after
        )

    def tick(self) -> int:
        """Release what is due; returns how many deliveries were sent to the queue."""
        now = self.clock()
        if self._last_housekeeping is None or (now - self._last_housekeeping).total_seconds() >= (
            self.config.housekeeping_every
        ):
            self.housekeeping(now)
            self._last_housekeeping = now
        released = 0
        while True:
            due = self.ledger.due(
                now,
                fresh_grace=self.config.fresh_grace,
                requeue_after=self.config.requeue_after,
                limit=self.config.batch,
            )
            if not due:
                break
            # Marked before sending, for the reason given in Ledger.mark_queued.
            self.ledger.mark_queued(due, now)
            try:
                self.enqueuer.send(due)
            except EnqueueFailed as exc:
                self.ledger.unmark_queued([i for i in due if i not in exc.sent], now)
                raise
            released += len(due)
            if len(due) < self.config.batch:
                break
        if released:
            log.info("reconciler.released", deliveries=released)
        return released

    def housekeeping(self, now: datetime) -> None:
        for delivery in self.ledger.release_stale_claims(now, self.config.stale_claim_after):
            log.warning("delivery.claim_released", delivery=delivery, reason="stale claim")
        for section in self.catalog.sections.values():
            for campaign_id in section.campaigns:
                if campaign_id not in self.catalog.campaigns:
                    continue
                expired = self.ledger.expire_waiting(
                    campaign_id, section.code, self.catalog.deadline_at(campaign_id, section.code), now
                )
                if expired:
                    log.info("deliveries.expired", campaign=campaign_id, section=section.code, count=expired)
        purged = self.ledger.purge_personal_data(now, timedelta(days=self.settings.pii_retention_days))
        if purged:
            log.info("appeals.personal_data_purged", count=purged)
        self.ledger.forget_signatures(now - timedelta(hours=1))
        if self.strays is not None:
            try:
                self.strays.sweep()
            except Exception as exc:  # noqa: BLE001 - Redis away: the next housekeeping looks again
                log.warning("reconciler.stranded_check_failed", error=f"{type(exc).__name__}: {exc}")

    def run(self, stop: threading.Event) -> None:
        log.info("reconciler.started", interval=self.config.interval)
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - Redis or the database away: try again next tick
                log.warning("reconciler.tick_failed", error=f"{type(exc).__name__}: {exc}")
            stop.wait(self.config.interval)
        log.info("reconciler.stopped")
