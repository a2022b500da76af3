"""The reconciler: the loop that keeps the ledger and the queue in agreement.

Each tick it sends to the queue the deliveries that are due and not on it: new appeals whose
immediate enqueue failed (Redis was down) or that joined a recipient's backlog, retries whose
backoff ran out, and queued letters whose message was lost. A recipient with caps gets its
letters paced over the time left before their deadlines (:mod:`dispatcher.queue.pacer`), not
all at once. Every few seconds it takes back the claims of workers whose liveness key lapsed (they
died mid-send: :mod:`dispatcher.queue.liveness`). Less often it takes back claims that went stale
(the backstop, for a worker that never had a liveness key), expires letters whose campaign
deadline passed, and purges personal data whose retention ran out. And it settles letters whose
channel's final report is late: it asks the channel (a fax gateway's ``get``) once the report
is ``poll_after`` late, and applies reports that overtook their send.

Several reconcilers may run (one per machine): a lease in Redis lets one release at a time
(:mod:`dispatcher.queue.leader`). Housekeeping is compare-and-set on every row, so all run it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

import redis

from dispatcher.channels.registry import Channels
from dispatcher.config.catalog import Catalog
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.store import Ledger
from dispatcher.logging import get_logger
from dispatcher.metrics.instruments import ReconcilerMetrics
from dispatcher.queue.actors import TIME_LIMIT_MS, EnqueueFailed, Enqueuer
from dispatcher.queue.deadletters import DeadLetterSweep
from dispatcher.queue.leader import Lease
from dispatcher.queue.liveness import DeadWorkers
from dispatcher.queue.loop import LoopThread
from dispatcher.queue.pacer import Pacer
from dispatcher.queue.reports import ReportApplier
from dispatcher.queue.status import last_tick_key
from dispatcher.queue.strays import StrandedMessages
from dispatcher.settings import Settings

log = get_logger("dispatcher.reconciler")

T = TypeVar("T")


@dataclass
class ReconcilerConfig:
    #: seconds between ticks
    interval: float = 1.0
    #: a new delivery is left to intake's own enqueue for this long
    fresh_grace: timedelta = timedelta(seconds=5)
    #: a queued delivery nobody claimed for this long gets a new message
    requeue_after: timedelta = timedelta(minutes=15)
    #: a claim older than this is taken back; above the actor's time limit so a slow send
    #: is never taken from a live worker. The backstop: a dead worker's claims normally come back
    #: through its lapsed liveness key within a minute (settings.worker_liveness_seconds)
    stale_claim_after: timedelta = field(default_factory=lambda: timedelta(milliseconds=TIME_LIMIT_MS + 60_000))
    #: seconds between housekeeping runs (stale claims, deadlines, retention, stranded messages)
    housekeeping_every: float = 30.0
    #: a message in a worker's dramatiq ack set this long, its letter not being sent, is put
    #: back on the queue (stranded by a Redis restart: dispatcher/queue/strays.py)
    stranded_after: timedelta = timedelta(minutes=2)
    batch: int = 1000
    #: letters whose report is late asked about per housekeeping pass, and how often one letter is
    #: asked again while its provider has nothing final to say
    polls_per_pass: int = 50
    repoll_after: timedelta = timedelta(minutes=5)
    #: a reconciler that stops renewing its lease for this long is replaced by another
    lease_seconds: float = 15.0


class Reconciler:
    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        ledger: Ledger,
        enqueuer: Enqueuer,
        pacer: Pacer,
        lease: Lease | None = None,
        config: ReconcilerConfig | None = None,
        clock: Callable[[], datetime] = utcnow,
        channels: Channels | None = None,
        reports: ReportApplier | None = None,
        metrics: ReconcilerMetrics | None = None,
    ):
        """``channels`` and ``reports``: to ask channels about late reports and apply them
        (None: this reconciler does not; a test's). ``metrics``: what it counts (docs/metrics.md)."""
        self.settings = settings
        self.catalog = catalog
        self.ledger = ledger
        self.enqueuer = enqueuer
        self.pacer = pacer
        #: None: this reconciler is the only one (a test, a single-machine setup without Redis)
        self.lease = lease
        self.config = config or ReconcilerConfig()
        self.clock = clock
        self.channels = channels
        self.reports = reports
        self.metrics = metrics
        #: the event loop the channels' polls run on (built on the first poll)
        self._loop: LoopThread | None = None
        #: per channel, when each letter awaiting a report was last asked about
        self._polled: dict[str, dict[str, datetime]] = {}
        self._last_housekeeping: datetime | None = None
        self._last_liveness: datetime | None = None
        # Both look at Redis itself, so only with a Redis broker (None with tests' stub queues).
        broker = getattr(enqueuer, "broker", None)
        self.dead_letters = DeadLetterSweep.for_broker(broker, ledger, clock=clock)
        self.strays = StrandedMessages.for_broker(broker, ledger.views.state_of, after=self.config.stranded_after)
        self.dead_workers = DeadWorkers.for_broker(broker, ttl_seconds=settings.worker_liveness_seconds)

    def tick(self) -> int:
        """Release what is due; returns how many deliveries were sent to the queue."""
        now = self.clock()
        if self._last_housekeeping is None or (now - self._last_housekeeping).total_seconds() >= (
            self.config.housekeeping_every
        ):
            self.housekeeping(now)
            self._last_housekeeping = now
        # Before releasing, so that a dead worker's letters go to the queue in this very tick.
        if self.dead_workers is not None and (
            self._last_liveness is None or (now - self._last_liveness).total_seconds() >= self.dead_workers.every
        ):
            self._last_liveness = now
            _on_its_own("reconciler.liveness_check_failed", lambda: self.release_dead_workers(now))
        if not self._leading():
            return 0
        self._note_tick(now)
        grace = self.config.fresh_grace
        due: list[str] = []
        for recipient in self.ledger.schedule.due_recipients(now, fresh_grace=grace):
            if self.pacer.paces(recipient):
                due += self.pacer.release(
                    recipient, now, fresh_grace=grace, tick=timedelta(seconds=self.config.interval)
                )
            else:
                due += self.ledger.schedule.due_for(
                    recipient.channel, recipient.recipient, now, fresh_grace=grace, limit=self.config.batch
                )
        due += self.ledger.schedule.lost_messages(now, requeue_after=self.config.requeue_after, limit=self.config.batch)
        for start in range(0, len(due), self.config.batch):
            batch = due[start : start + self.config.batch]
            # Marked before sending, for the reason given in Ledger.mark_queued.
            self.ledger.lifecycle.mark_queued(batch, now)
            try:
                self.enqueuer.send(batch)
            except EnqueueFailed as exc:
                self.ledger.lifecycle.unmark_queued([i for i in due[start:] if i not in exc.sent], now)
                self.pacer.forget()  # its plans counted letters that did not go
                raise
        if due:
            log.info("reconciler.released", deliveries=len(due))
        return len(due)

    def _note_tick(self, now: datetime) -> None:
        """Tell operators this reconciler is ticking (the console's overview): a day-long key, so
        that a reconciler that stopped shows when it last ticked."""
        if self.lease is None:
            return
        value = json.dumps({"holder": self.lease.identity, "at": now.isoformat()})
        with contextlib.suppress(redis.RedisError):
            self.lease.keys.client.set(last_tick_key(self.settings.redis_namespace), value, ex=24 * 3600)

    def _leading(self) -> bool:
        if self.lease is None:
            return True
        was = self.lease.held
        if not self.lease.hold():
            return False
        if not was:
            self.pacer.forget()  # another reconciler released letters while we stood by
        return True

    def release_dead_workers(self, now: datetime) -> list[str]:
        """Claims of workers seen dead back to planned, due now; returns the deliveries. Every
        reconciler does it: the release is compare-and-set on state and claimant."""
        if self.dead_workers is None:
            return []
        dead = self.dead_workers.look()
        if not dead:
            return []
        released = self.ledger.lifecycle.release_claims(now, workers=dead)
        for delivery in released:
            log.warning("delivery.claim_released", delivery=delivery, reason="worker liveness lapsed")
        log.warning("worker.seen_dead", workers=dead, claims_released=len(released))
        if self.metrics is not None:
            self.metrics.claims_released.labels("worker_dead").inc(len(released))
        # Only once the ledger has the release: if it failed, the next look tries again.
        self.dead_workers.forget(dead)
        return released

    def housekeeping(self, now: datetime) -> None:
        stale = self.ledger.lifecycle.release_claims(now, claimed_before=now - self.config.stale_claim_after)
        for delivery in stale:
            log.warning("delivery.claim_released", delivery=delivery, reason="stale claim")
        if stale and self.metrics is not None:
            self.metrics.claims_released.labels("stale").inc(len(stale))
        for section in self.catalog.sections.values():
            for campaign_id in section.campaigns:
                if campaign_id not in self.catalog.campaigns:
                    continue
                expired = self.ledger.lifecycle.expire(
                    campaign_id, section.code, self.catalog.deadline_at(campaign_id, section.code), now
                )
                if expired:
                    log.info("deliveries.expired", campaign=campaign_id, section=section.code, count=expired)
        purged = self.ledger.housekeeping.purge_personal_data(now, timedelta(days=self.settings.pii_retention_days))
        if purged:
            log.info("appeals.personal_data_purged", count=purged)
        self.ledger.housekeeping.forget_signatures(now - timedelta(hours=1))
        self.sweep_dead_letters()
        if self.strays is not None:
            _on_its_own("reconciler.stranded_check_failed", self.strays.sweep)
        if self.lease is None or self.lease.held:
            # One reconciler asks the providers; the others would only ask again.
            _on_its_own("reconciler.late_reports_failed", lambda: self.settle_late_reports(now))

    def settle_late_reports(self, now: datetime) -> int:
        """Apply reports that overtook their send, and ask each channel that can about letters
        whose final report is late; returns how many letters were settled."""
        if self.channels is None or self.reports is None:
            return 0
        settled = self.reports.apply_parked()
        for kind in self.channels:
            if kind.poll_after is None:
                continue
            channel = self.channels.get(kind.name)
            if channel.poll_after is None:
                continue
            waiting = self.ledger.schedule.awaiting_reports(
                [kind.name], sent_before=now - channel.poll_after, limit=self.config.batch
            )
            # Bounded: housekeeping runs inside the tick, and a provider that is slow to answer
            # must not hold up the release of due letters; a letter still unsettled is asked
            # again only after a while. Only letters still waiting are remembered.
            asked = {w.id: at for w in waiting if (at := self._polled.get(kind.name, {}).get(w.id))}
            self._polled[kind.name] = asked
            due = [w for w in waiting if w.id not in asked or now - asked[w.id] >= self.config.repoll_after]
            for letter in due[: self.config.polls_per_pass]:
                section = self.catalog.sections.get(letter.section)
                if section is None or letter.remote_id is None:
                    continue
                asked[letter.id] = now
                try:
                    report = self._run(
                        channel.poll(letter.id, letter.remote_id, section), min(channel.send_timeout, 30.0)
                    )
                except Exception as exc:  # noqa: BLE001 - the provider is away: ask again next time
                    log.warning(f"{kind.name}.poll_failed", delivery=letter.id, error=f"{type(exc).__name__}: {exc}")
                    continue
                if report is None or not report.final:
                    log.info(f"{kind.name}.report_late", delivery=letter.id, remote_id=letter.remote_id)
                    continue
                answer = self.reports.apply(kind.name, replace(report, tag=letter.id))
                log.info(f"{kind.name}.report_polled", delivery=letter.id, remote_id=letter.remote_id, result=answer)
                settled += answer == "applied"
        return settled

    def _run(self, work: Coroutine[Any, Any, T], timeout: float) -> T:
        if self._loop is None:
            self._loop = LoopThread()
        return self._loop.run(work, timeout=timeout)

    def close(self) -> None:
        if self._loop is not None:
            for channel in self.channels.built() if self.channels is not None else []:
                try:
                    self._run(channel.aclose(), 10)
                except Exception as exc:  # noqa: BLE001 - stopping anyway
                    log.warning("reconciler.channel_close_failed", error=f"{type(exc).__name__}: {exc}")
            self._loop.stop()
            self._loop = None

    def run(self, stop: threading.Event) -> None:
        log.info("reconciler.started", interval=self.config.interval)
        while not stop.is_set():
            try:
                released = self.tick()
            except Exception as exc:  # noqa: BLE001 - Redis or the database away: try again next tick
                log.warning("reconciler.tick_failed", error=f"{type(exc).__name__}: {exc}")
                if self.metrics is not None:
                    self.metrics.tick_failures.inc()
            else:
                if self.metrics is not None:
                    self.metrics.ticks.inc()
                    self.metrics.released.inc(released)
                    self.metrics.last_tick.set(time.time())
            if self.metrics is not None:
                self.metrics.leader.set(1 if self.lease is None or self.lease.held else 0)
            stop.wait(self.config.interval)
        if self.lease is not None:
            self.lease.release()  # a successor need not wait for it to expire
        self.close()
        log.info("reconciler.stopped")

    def sweep_dead_letters(self) -> int:
        """Record dead letters that only Redis has (their worker could not write to the ledger)."""
        if self.dead_letters is None:
            return 0
        return _on_its_own("reconciler.dead_letter_sweep_failed", self.dead_letters.run) or 0


def _on_its_own(event: str, sweep: Callable[[], T]) -> T | None:
    """Run a sweep of Redis so that Redis (or the database) being away never holds up the rest of
    housekeeping; the next housekeeping tries again."""
    try:
        return sweep()
    except Exception as exc:  # noqa: BLE001 - logged; retried at the next housekeeping
        log.warning(event, error=f"{type(exc).__name__}: {exc}")
        return None


def reconciler_identity() -> str:
    """Names one reconciler in its lease: the machine and process for operators, plus a random
    part, since two reconcilers in one process (tests, an embedding app) must not share a lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
