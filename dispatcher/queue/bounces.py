"""Bounces, as they come back (``dispatcher bounces``: an SMTP listener for the bounce domain's
MX, and IMAP pollers for sections whose bounces land in a mailbox), applied to the ledger.

The channel reads the message (:meth:`Channel.read_bounce`: the VERP token names the letter,
the DSN gives the status); this module decides what it does:

* a hard bounce: the letter becomes ``bounced``; when the failure is about the address, the
  address is suppressed for every campaign and section; the route's fallback channel, if any,
  carries the letter instead (:mod:`dispatcher.queue.fallback`);
* a soft bounce (the relay gave up on a full mailbox): the letter is tried again after the
  ledger's backoff; ``soft_bounce_limit`` of them for one address within
  ``soft_bounce_window_days`` count as a hard bounce;
* a delay warning or an auto-reply: recorded (an auto-reply says the mailbox exists), nothing
  moves;
* the same bounce again (a relay that missed our 250, the IMAP poller's at-least-once): its
  fact is kept already, so nothing is recorded or moved and it is counted as ``duplicate``;
* anything without a valid token, about an unknown letter, or unreadable: logged and dropped,
  and counted in :attr:`BounceIntake.counts`.

Only the facts are kept (:class:`dispatcher.ledger.bounces.BounceFacts`), never the message.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from dispatcher.channels.base import Bounce, Channel, Report, Status
from dispatcher.config.catalog import Catalog
from dispatcher.errors import Bounced, DeliveryError, TransientError
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.states import State
from dispatcher.ledger.store import Ledger
from dispatcher.ledger.views import DeliveryView
from dispatcher.logging import get_logger
from dispatcher.queue.reports import PARKED, ReportApplier
from dispatcher.settings import Settings

log = get_logger("dispatcher.bounces")


@dataclass(frozen=True)
class Handled:
    """What became of one message: ``applied`` (the letter moved), ``recorded`` (kept as a fact,
    nothing moved), ``dropped`` (logged and counted), ``later`` (its letter is still being sent:
    the sender should try again, so nothing is lost)."""

    outcome: str
    why: str = ""


class BounceIntake:
    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        ledger: Ledger,
        channel: Channel,
        reports: ReportApplier,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.settings = settings
        self.catalog = catalog
        self.ledger = ledger
        self.channel = channel
        self.reports = reports
        self.clock = clock
        #: messages by what became of them ("applied", "dropped:forged", ...), for the operator
        self.counts: Counter[str] = Counter()

    def handle(self, raw: bytes, *, envelope_recipients: Sequence[str] = (), truncated: bool = False) -> Handled:
        name = self.channel.name
        bounce = self.channel.read_bounce(
            raw, envelope_recipients=envelope_recipients, truncated=truncated, sections=self.catalog.sections.values()
        )
        size = {"size": len(raw), "truncated": truncated or None}
        if bounce is None or bounce.kind in ("not_a_bounce", "unreadable"):
            why = "unreadable" if bounce is None else bounce.kind
            return self._drop(why, **size, reason=None if bounce is None else bounce.reason)
        if bounce.tag is None:
            # a forged token is someone trying to make us drop an office: worth an operator's look
            return self._drop(bounce.untagged or "no_token", **size, kind=bounce.kind, status=bounce.status)
        row = self.ledger.views.delivery(bounce.tag)
        if row is None or row.channel != name:
            return self._drop("unknown_letter", delivery=bounce.tag, kind=bounce.kind, status=bounce.status)
        if row.state is State.SENDING:
            # the bounce overtook the send's own answer: the relay tries us again shortly
            self.counts["later"] += 1
            log.info(f"{name}.bounce_early", delivery=row.id, kind=bounce.kind)
            return Handled("later", "its letter is still being sent")
        now = self.clock()
        context = {"delivery": row.id, **_facts(bounce)}
        fact = self.ledger.bounces.record(
            delivery=row.id,
            channel=name,
            address=row.recipient,
            kind=bounce.kind,
            now=now,
            status=bounce.status,
            diagnostic=bounce.diagnostic,
            reporting_mta=bounce.reporting_mta,
            arrived_at=bounce.reported_at,
        )
        if fact is None:
            # Applied (or kept) when it first came: again, it would count twice towards
            # soft_bounce_limit, and move a retry that this bounce is not about.
            self.counts["duplicate"] += 1
            log.info(f"{name}.bounce_duplicate", **context)
            return Handled("recorded", "the same bounce came before")
        if bounce.kind == "auto_reply":
            self.counts["auto_reply"] += 1
            log.info(f"{name}.auto_reply", **context, note="the mailbox exists")
            return Handled("recorded", "auto-reply: the mailbox exists")
        if bounce.kind == "delayed":
            self.counts["delayed"] += 1
            log.info(f"{name}.bounce_delayed", **context)
            return Handled("recorded", "delay warning: the relay still tries")
        try:
            answer = self._apply(bounce, row, now)
        except Exception:
            # not applied (the ledger is away): the sender retries, and then it is no duplicate
            self.ledger.bounces.forget(fact)
            raise
        if answer is None:
            return self._drop("letter_settled", **context)
        if answer == "applied":
            self.counts["applied"] += 1
            return Handled("applied", f"{bounce.kind} bounce")
        if answer == PARKED:
            self.ledger.bounces.forget(fact)
            self.counts["later"] += 1
            return Handled("later", answer)
        # a duplicate, or a bounce for a try that is over: its facts are kept, nothing moves
        self.counts["recorded"] += 1
        log.info(f"{name}.bounce_recorded", **context, why=answer)
        return Handled("recorded", answer)

    def _apply(self, bounce: Bounce, row: DeliveryView, now: datetime) -> str | None:
        """The bounce's move of its letter, through the report applier: its answer, or None when
        the letter's ``sent`` is final already (past the channel's window)."""
        name = self.channel.name
        error = self._error(bounce, row.recipient, now)
        settled_after = self.channel.sent_final_after
        if row.state is State.SENT and settled_after is not None and row.sent_at and now - row.sent_at > settled_after:
            # Past the channel's window the letter's `sent` is final (and its supporter's data may
            # be purged): it stays as it is, but a dead address is still worth knowing.
            if isinstance(error, Bounced) and error.suppress:
                self.ledger.suppressions.add(
                    name,
                    row.recipient,
                    reason="bounced",
                    code=bounce.status,
                    text=error.message,
                    delivery=row.id,
                    now=now,
                )
            return None
        report = Report(
            Status.FAILED,
            row.remote_id,
            tag=row.id,
            code=bounce.status,
            text=error.message,
            error=error,
            provider=bounce.reporting_mta,
        )
        return self.reports.apply(name, report)

    def _error(self, bounce: Bounce, address: str, now: datetime) -> DeliveryError:
        said = " ".join(p for p in (bounce.status, bounce.diagnostic) if p) or "no status given"
        if bounce.kind == "soft":
            since = now - timedelta(days=self.settings.soft_bounce_window_days)
            seen = self.ledger.bounces.count(self.channel.name, address, "soft", since)
            if seen >= self.settings.soft_bounce_limit:
                return Bounced(
                    f"{seen} soft bounces within {self.settings.soft_bounce_window_days} days, counted as hard "
                    f"(last: {said})",
                    code=bounce.status,
                    suppress=True,
                )
            return TransientError(f"soft bounce: {said}", code=bounce.status)
        return Bounced(f"bounced: {said}", code=bounce.status, suppress=bounce.suppress)

    def _drop(self, why: str, **context: object) -> Handled:
        self.counts[f"dropped:{why}"] += 1
        log.warning(
            f"{self.channel.name}.bounce_dropped", why=why, **{k: v for k, v in context.items() if v is not None}
        )
        return Handled("dropped", why)


def _facts(bounce: Bounce) -> dict[str, object]:
    facts = {
        "kind": bounce.kind,
        "status": bounce.status,
        "diagnostic": bounce.diagnostic,
        "reporting_mta": bounce.reporting_mta,
        "reported_at": bounce.reported_at.isoformat() if bounce.reported_at else None,
    }
    return {k: v for k, v in facts.items() if v is not None}
