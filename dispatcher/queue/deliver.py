"""What the deliver actor does with one delivery id: claim ▶ check ▶ render ▶ send ▶ record.

The claim is a compare-and-set in the ledger, so a redelivered message for a letter that is
already sent, or being sent by another worker, does nothing. Every outcome is recorded as an
attempt and one state change, and logged as one event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import jinja2

from dispatcher.channels.base import Channel, Outgoing, Report, Status
from dispatcher.channels.registry import Channels
from dispatcher.config.catalog import Catalog
from dispatcher.config.models import Section, Target
from dispatcher.errors import (
    DeferredError,
    DeliveryError,
    DispatchError,
    DocumentRejected,
    OperationalError,
    Outcome,
    TransientError,
    UnknownChannel,
)
from dispatcher.ledger.bounces import Suppressed
from dispatcher.ledger.controls import Pause
from dispatcher.ledger.lifecycle import CANCELLED_OUTCOME, ERASED_TEXT, Claim
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.states import Event, State
from dispatcher.ledger.store import Ledger
from dispatcher.ledger.views import SupporterData
from dispatcher.logging import get_logger
from dispatcher.metrics.instruments import WorkerMetrics
from dispatcher.policy.gate import SendingGate
from dispatcher.policy.lines import Lines
from dispatcher.queue.fallback import Fallback
from dispatcher.queue.loop import LoopThread
from dispatcher.queue.outcomes import Outcomes, Result
from dispatcher.queue.window import SendWindow
from dispatcher.render.documents import Documents
from dispatcher.render.letters import LetterRequest, Supporter, TemplateMissing
from dispatcher.settings import Settings

log = get_logger("dispatcher.delivery")

EVENTS = {
    State.SENT: "delivery.sent",
    State.DELIVERED: "delivery.delivered",
    State.FAILED: "delivery.failed",
    State.BOUNCED: "delivery.bounced",
    State.REROUTED: "delivery.rerouted",
    State.EXPIRED: "delivery.expired",
    State.CANCELLED: "delivery.cancelled",
}


class Sender(NamedTuple):
    """Whom a letter is from ("Jane Doe via <section>"; the section alone for a digest) and where
    replies go."""

    name: str
    reply_to: str


@dataclass(frozen=True)
class NoLetter:
    """Why a delivery has no letter to write."""

    why: str


def letter_request(
    catalog: Catalog,
    ledger: Ledger,
    *,
    delivery_id: str,
    kind: str,
    appeal_id: str | None,
    supporter: SupporterData | None,
    campaign: str,
    section: Section,
    target: Target,
    language: str,
    now: datetime,
) -> tuple[Sender, LetterRequest] | NoLetter:
    """What to render for a delivery, dated ``now`` where the letter arrives: the worker's letter,
    and the console's preview of it (dispatcher/queue/preview.py). ``supporter``: the appeal's, as
    the caller read it (the worker's claim reads it in its own statement); None for a digest, or
    when the supporter's data is gone. A digest's signers are read from the ledger."""
    # the day it is where the letter arrives
    day = now.astimezone(ZoneInfo(target.timezone)).date()
    found = catalog.campaigns[campaign]
    if kind == "digest":
        signers = ledger.schedule.digest_signers(delivery_id)
        if not signers:
            return NoLetter("none of the digest's letters is waiting any more")
        # The section signs a digest and takes the replies; the supporters are listed below it.
        return Sender("", str(section.sender.address)), LetterRequest(
            campaign=found,
            section=section,
            target=target,
            language=language,
            supporter=Supporter(section.sender.name, str(section.sender.address)),
            message=None,
            date=day,
            signers=tuple(Supporter(s.name, s.email, s.city, s.country) for s in signers),
        )
    assert appeal_id is not None  # every letter but a digest belongs to an appeal
    if supporter is None:
        return NoLetter("the supporter's data was purged before sending")
    return Sender(supporter.name, supporter.email), LetterRequest(
        campaign=found,
        section=section,
        target=target,
        language=language,
        supporter=Supporter(supporter.name, supporter.email, supporter.city, supporter.country),
        message=supporter.message,
        date=day,
    )


class ChannelFault(DispatchError):
    """An OperationalError raised by a channel's own send: the channel itself is unusable."""

    def __init__(self, error: OperationalError):
        super().__init__(str(error))
        self.error = error


@contextmanager
def channel_faults() -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        raise ChannelFault(exc) from exc


def _context(claim: Claim) -> dict[str, Any]:
    return {
        "delivery": claim.id,
        "appeal": claim.appeal_id,
        "campaign": claim.campaign,
        "section": claim.section,
        "target": claim.target,
        "channel": claim.channel,
        "attempt": claim.attempt,
    }


def log_document_rejected(channel: str, error: DeliveryError, **context: Any) -> None:
    # Our document was refused: a bug on our side, never just a letter's bad luck.
    log.error(f"{channel}.document_rejected", **context, code=error.code, reason=error.message)


class DeliveryProcessor:
    """Channel-agnostic: the channel registry says how each letter is rendered and sent, which
    caps and office hours hold it, whether one letter at a time goes to its recipient, and how an
    uncertain earlier try is found again."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        ledger: Ledger,
        channels: Channels,
        documents: Documents,
        loop: LoopThread,
        worker_id: str,
        outcomes: Outcomes,
        lines: Lines | None = None,
        gate: SendingGate | None = None,
        parked_reports: Callable[[str], int] | None = None,
        clock: Callable[[], datetime] = utcnow,
        metrics: WorkerMetrics | None = None,
    ):
        """``parked_reports``: applies the reports that overtook a letter's send once the send
        is recorded (:meth:`dispatcher.queue.reports.ReportApplier.apply_parked`)."""
        self.settings = settings
        self.catalog = catalog
        self.ledger = ledger
        self.channels = channels
        self.documents = documents
        self.lines = lines
        self.loop = loop
        self.worker_id = worker_id
        self.outcomes = outcomes
        self.gate = gate
        self.parked_reports = parked_reports
        self._controls_cache: tuple[float, dict[str, Pause], frozenset[str]] | None = None
        self._suppressions_cache: tuple[float, tuple[int, int | None], frozenset[tuple[str, str]]] | None = None
        self.clock = clock
        #: at most one letter of this process between DATA and its recorded `sent` (window.py)
        self.window = SendWindow()
        self.fallback = Fallback(catalog=catalog, channels=channels, ledger=ledger)
        #: in-memory counters (docs/metrics.md); None: this processor counts nothing
        self.metrics = metrics

    def __call__(self, delivery_id: str) -> None:
        try:
            self._deliver(delivery_id)
        finally:
            # Never leave this thread's letter in the send window (an error while recording, a time limit).
            self.window.close()

    def _deliver(self, delivery_id: str) -> None:
        now = self.clock()
        claim = self.ledger.lifecycle.claim(delivery_id, self.worker_id, now)
        if claim is None:
            # A redelivered or duplicate message: worth seeing, since it means a worker or Redis hiccuped.
            log.info("delivery.skipped", delivery=delivery_id, state=self.ledger.views.state_of(delivery_id))
            if self.metrics is not None:
                self.metrics.skipped.inc()
            return
        context = _context(claim)
        started = time.perf_counter()
        try:
            result = self._attempt(claim, now)
        except Exception as exc:
            log.exception("delivery.internal_error", **context)
            result = self.outcomes.transient(
                TransientError(f"internal error: {type(exc).__name__}"),
                attempt=claim.attempt,
                now=now,
                deadline=self.catalog.deadline_at(claim.campaign, claim.section),
                created_at=claim.created_at,
            )
        if claim.kind == "letter":
            result = self.fallback.with_replan(
                result, campaign=claim.campaign, section=claim.section, target=claim.target, channel=claim.channel
            )
        finished = max(self.clock(), now)
        moved = self.ledger.lifecycle.finish(claim, result, worker=self.worker_id, started_at=now, now=finished)
        # The outcome is committed: the next letter of this process may start its DATA.
        self.window.close()
        if self.metrics is not None:
            self._count(claim, result, moved)
        if (
            self.parked_reports is not None
            and claim.channel in self.channels
            and self.channels.kind(claim.channel).sent_final_after is None
        ):
            # A report may have overtaken the send's own answer: apply it now that the send is
            # recorded (or drop it, if the answer itself was final or the try failed).
            self.parked_reports(claim.id)
        if result.flag_number:
            self.ledger.controls.flag_number(claim.recipient, result.text or "suspect recipient", claim.id, finished)
            log.error(f"{claim.channel}.recipient_flagged", **context, reason=result.text)
        if moved is not None:
            self.fallback.record(
                result, delivery=claim.id, channel=claim.channel, recipient=claim.recipient, now=finished
            )
            if result.suppress:
                self._suppressions_cache = None  # this process's next letter knows at once
        # (cancelled instead of waiting again when its campaign closed meanwhile)
        closed = moved is State.CANCELLED and result.state is not State.CANCELLED
        if result.outcome == Outcome.OPERATIONAL:
            level = log.error
        elif (moved or result.state) in (State.FAILED, State.BOUNCED):
            # a letter lost for good (an unknown address, a 550): an operator should see it
            level = log.warning
        else:
            level = log.info
        level(
            EVENTS.get(moved or result.state, "delivery.retry_scheduled"),
            **context,
            outcome=result.outcome,
            code=result.code,
            reason=self._why_cancelled(claim)
            if closed
            else (result.text if result.state not in (State.SENT, State.DELIVERED) else None),
            next_attempt_at=result.next_attempt_at.isoformat() if result.next_attempt_at else None,
            remote_id=result.remote_id,
            gateway=result.gateway,
            pages=result.pages,
            line_seconds=result.line_seconds,
            replacement=result.replan.id if result.replan is not None and moved == result.state else None,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
            queued_to_sent_ms=round((finished - claim.queued_at).total_seconds() * 1000, 1)
            if claim.queued_at and result.state in (State.SENT, State.DELIVERED)
            else None,
        )

    def _why_cancelled(self, claim: Claim) -> str:
        """Why a letter was cancelled on its way back to waiting (lifecycle.py's guard)."""
        if claim.appeal_id is not None and self.ledger.erasures.is_erased(claim.appeal_id):
            return "the supporter's data was erased meanwhile"
        return "the campaign was closed meanwhile"

    def _count(self, claim: Claim, result: Result, moved: State | None) -> None:
        assert self.metrics is not None
        if moved is None:
            what = "superseded"  # the claim was taken back meanwhile: the try is recorded, nothing moved
        elif moved is State.PLANNED:
            what = result.event.value  # retry or deferred
        else:
            what = moved.value
        self.metrics.tried(claim.channel, what, str(result.outcome), result.reason)
        if result.pages or result.line_seconds:
            self.metrics.line.record(claim.channel, result.gateway, result.pages, result.line_seconds)

    def _controls(self, fresh: bool = False) -> tuple[dict[str, Pause], frozenset[str]]:
        """Paused channels and flagged recipients, read at most once a second: a pause matters
        within seconds, and the hot path should not pay two queries per letter for it."""
        now = time.monotonic()
        if fresh or self._controls_cache is None or now - self._controls_cache[0] > 1.0:
            flagged = frozenset(f.number for f in self.ledger.controls.flagged_numbers())
            self._controls_cache = (now, self.ledger.controls.paused_channels(), flagged)
        return self._controls_cache[1], self._controls_cache[2]

    def _suppressed(self, channel: str, recipient: str) -> Suppressed | None:
        """The suppression of ``recipient``, from a set of suppressed addresses re-read only when
        the list changed (checked at most once a second): one cheap query a second instead of one
        per letter. A letter sent within that second to an address just suppressed bounces
        like the one before it, and is rerouted the same way."""
        now = time.monotonic()
        cached = self._suppressions_cache
        if cached is None or now - cached[0] > 1.0:
            version = self.ledger.suppressions.version()
            keys = cached[2] if cached is not None and cached[1] == version else self.ledger.suppressions.keys()
            cached = self._suppressions_cache = (now, version, keys)
        if (channel, recipient.strip().lower()) not in cached[2]:
            return None
        return self.ledger.suppressions.find(channel, recipient)

    def _held_back(self, channel_key: str, recipient: str) -> tuple[Pause | None, bool]:
        paused, flagged = self._controls()
        if channel_key in paused or recipient in flagged:
            # Trust the cache only for "go ahead": a resume or an unflag must take effect at
            # once, not after a stale cache has held the letter back for another interval.
            paused, flagged = self._controls(fresh=True)
        return paused.get(channel_key), recipient in flagged

    # ------------------------------------------------------------------ one try

    def _attempt(self, claim: Claim, now: datetime) -> Result:
        campaign = self.catalog.campaigns.get(claim.campaign)
        section = self.catalog.sections.get(claim.section)
        if campaign is None or section is None or claim.campaign not in section.campaigns:
            return self.outcomes.operational(
                OperationalError(f"campaign {claim.campaign!r} / section {claim.section!r} is no longer configured"),
                now=now,
            )
        if campaign.status == "closed":
            return Result(
                Event.CANCELLED, "cancelled", text=f"campaign closed: {campaign.closed_reason or 'no reason given'}"
            )
        deadline = self.catalog.deadline_at(campaign.id, section.code)
        if now >= deadline:
            return Result(Event.EXPIRED, "expired", text=f"campaign deadline {deadline.isoformat()} passed")
        if self.settings.live and campaign.sandbox_only:
            return self.outcomes.operational(
                OperationalError(f"campaign {campaign.id!r} is sandbox-only: its targets are example data"), now=now
            )
        try:
            channel = self.channels.get(claim.channel)
        except UnknownChannel as exc:
            # Not the letter's fault: it waits for a worker that has the channel, like any pause.
            return self.outcomes.operational(OperationalError(f"this worker cannot send it: {exc}"), now=now)
        suppressed = self._suppressed(claim.channel, claim.recipient)
        if suppressed is not None:
            return self.fallback.instead_of(
                suppressed,
                campaign=claim.campaign,
                section=claim.section,
                target=claim.target,
                channel=claim.channel,
                letter=claim.kind == "letter",
            )
        target = self.catalog.target(claim.campaign, claim.section, claim.target)
        built = self._request(claim, section, target, now)
        if isinstance(built, Result):
            return built
        sender, request = built
        channel_key = f"{claim.channel}:{claim.section}"
        try:
            paused, flagged = self._held_back(channel_key, claim.recipient)
            if paused is not None:
                raise DeferredError(
                    f"channel {channel_key} is paused ({paused.reason}); `dispatcher channel resume {channel_key}`",
                    retry_after=self.outcomes.retry.operational_pause_seconds,
                    reason="paused",
                )
            if flagged:
                reason = self.ledger.controls.flagged(claim.recipient)
                raise OperationalError(f"recipient flagged for an operator ({reason}); clear it to resume")
            if self.gate is not None:
                # Office hours and the recipient's caps: a letter that may not go now is deferred.
                provider = channel.provider(section)
                self.gate.admit(
                    target=target,
                    channel=claim.channel,
                    recipient=claim.recipient,
                    token=f"{claim.id}:{claim.attempt}",
                    now=now,
                    provider=provider.key if provider else None,
                    provider_rates=provider.rates if provider else (),
                )
            # Only now: a letter held back above was never being sent.
            log.info("delivery.sending", **_context(claim))
            try:
                return self._send(channel, claim, section, target, sender, request, now, deadline)
            except ChannelFault as fault:
                # The relay or gateway refuses us (credentials, funds, our sender): pause the
                # channel so its other letters wait instead of each hitting the same wall.
                if self.ledger.controls.pause_channel(channel_key, str(fault.error), now):  # code and text
                    log.error("channel.paused", channel=channel_key, reason=fault.error.message, code=fault.error.code)
                self._controls_cache = None
                raise fault.error from None
        except DeliveryError as exc:
            return self.outcomes.of_error(
                exc, attempt=claim.attempt, now=now, deadline=deadline, created_at=claim.created_at
            )
        except (TemplateMissing, jinja2.TemplateError) as exc:
            # A deployment fault (a letter template missing or broken), not the letter's: pause it.
            return self.outcomes.operational(
                OperationalError(f"letter cannot be rendered: {type(exc).__name__}: {exc}"), now=now
            )

    def _request(
        self, claim: Claim, section: Section, target: Target, now: datetime
    ) -> tuple[Sender, LetterRequest] | Result:
        built = letter_request(
            self.catalog,
            self.ledger,
            delivery_id=claim.id,
            kind=claim.kind,
            appeal_id=claim.appeal_id,
            supporter=claim.supporter,  # read by the claim itself
            campaign=claim.campaign,
            section=section,
            target=target,
            language=claim.language,
            now=now,
        )
        if isinstance(built, NoLetter):
            if claim.kind == "digest":
                return Result(Event.CANCELLED, "cancelled", text=built.why)
            if claim.appeal_id is not None and self.ledger.erasures.is_erased(claim.appeal_id):
                # erased while this worker held the letter: nothing is rendered, nothing sent
                return Result(Event.CANCELLED, CANCELLED_OUTCOME, text=ERASED_TEXT)
            return Result(Event.FAILED, Outcome.PERMANENT, text=built.why)
        return built

    def _send(
        self,
        channel: Channel,
        claim: Claim,
        section: Section,
        target: Target,
        sender: Sender,
        request: LetterRequest,
        now: datetime,
        deadline: datetime,
    ) -> Result:
        lines = self.lines if channel.one_at_a_time else None
        if lines is not None and not lines.take(claim.recipient, claim.id):
            raise DeferredError(
                f"another {claim.channel} letter to this recipient is in flight",
                retry_after=getattr(channel, "line_wait_seconds", 60.0),
                reason="line_busy",
            )
        keep_line = False
        try:
            if claim.attempt > 1:
                # An earlier try may have gone out although its answer was lost or its worker
                # died: adopt it rather than send the letter twice.
                earlier = self.loop.run(channel.find(claim.id, section), timeout=channel.send_timeout)
                if earlier is not None and earlier.status is not Status.FAILED:
                    keep_line = not earlier.final
                    return self._result(earlier, claim, now, deadline)
            document = self.documents.render(channel.document, request, now)
            letter = Outgoing(
                tag=claim.id,
                message_id=claim.message_id,
                recipient=claim.recipient,
                section=section,
                target=target,
                sender_name=sender.name,
                reply_to=sender.reply_to,
                document=document,
                date=self.clock(),
                attempt=claim.attempt,
                window=self.window.ticket(),
            )
            # the CPU work in this thread; the shared event loop only sends (or nothing: a
            # blocking channel sends from here too)
            letter = channel.prepare(letter)
            sending = time.perf_counter()
            try:
                with channel_faults():
                    if channel.blocking:
                        report = channel.deliver_blocking(letter, timeout=channel.send_timeout)
                    else:
                        report = self.loop.run(channel.deliver(letter), timeout=channel.send_timeout)
            finally:
                if self.metrics is not None:
                    self.metrics.send_seconds.labels(claim.channel).observe(time.perf_counter() - sending)
            # Accepted by a far side that reports later: the line stays ours until its report.
            keep_line = not report.final
            return self._result(report, claim, now, deadline)
        finally:
            if lines is not None and not keep_line:
                lines.give_back(claim.recipient, claim.id)

    def _result(self, report: Report, claim: Claim, now: datetime, deadline: datetime) -> Result:
        if isinstance(report.error, DocumentRejected):
            log_document_rejected(claim.channel, report.error, delivery=claim.id, gateway=report.provider)
        return self.outcomes.of_report(
            report, attempt=claim.attempt, now=now, deadline=deadline, created_at=claim.created_at
        )
