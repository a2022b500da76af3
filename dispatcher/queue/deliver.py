"""What the deliver actor does with one delivery id: claim ▶ check ▶ render ▶ send ▶ record.

The claim is a compare-and-set in the ledger, so a redelivered message for a letter that is
already sent, or being sent by another worker, does nothing. Every outcome is recorded as an
attempt and one state change, and logged as one event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import jinja2

from dispatcher.channels.email.channel import EmailChannel
from dispatcher.channels.email.message import build_message
from dispatcher.channels.fax.base import FailureKind, FaxJob, FaxReport, FaxStatus
from dispatcher.channels.fax.lines import FaxLines
from dispatcher.config.catalog import Catalog
from dispatcher.config.models import Section, Target
from dispatcher.errors import DeferredError, DeliveryError, OperationalError, Outcome, TransientError
from dispatcher.ledger.controls import Pause
from dispatcher.ledger.lifecycle import Claim
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.states import Event, State
from dispatcher.ledger.store import Ledger
from dispatcher.logging import get_logger
from dispatcher.queue.loop import LoopThread
from dispatcher.queue.outcomes import Outcomes, Result
from dispatcher.queue.window import SendWindow
from dispatcher.render.letters import LetterRequest, Renderer, Supporter, TemplateMissing
from dispatcher.settings import Settings

log = get_logger("dispatcher.delivery")

#: a send that takes longer than this is abandoned and retried (the SMTP pool has its own timeouts)
SEND_TIMEOUT_SECONDS = 120.0
#: a fax lab call is simulated in well under a second; a gateway create call is one HTTP request
FAX_TIMEOUT_SECONDS = 300.0

EVENTS = {
    State.SENT: "delivery.sent",
    State.DELIVERED: "delivery.delivered",
    State.FAILED: "delivery.failed",
    State.EXPIRED: "delivery.expired",
    State.CANCELLED: "delivery.cancelled",
}


def _provider(section: Section, channel: str) -> tuple[str | None, tuple[str, ...]]:
    """The relay or gateway account a letter of ``section`` goes through, and its limits."""
    if channel == "email":
        return f"relay:{section.smtp.host}:{section.smtp.port}", section.smtp.rate
    if channel == "fax" and section.fax is not None:
        return f"gateway:{section.fax.gateway}:{section.code}", section.fax.rate
    return None, ()


class Sender(NamedTuple):
    """Whom an email letter is from ("Jane Doe via <section>"; the section alone for a digest)
    and where replies go."""

    name: str
    reply_to: str


class ChannelFault(Exception):
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


class DeliveryProcessor:
    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        ledger: Ledger,
        renderer: Renderer,
        email: EmailChannel,
        loop: LoopThread,
        worker_id: str,
        fax: Any = None,
        fax_renderer: Any = None,
        lines: FaxLines | None = None,
        outcomes: Outcomes,
        gate: Any = None,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.settings = settings
        self.catalog = catalog
        self.ledger = ledger
        self.renderer = renderer
        self.email = email
        self.fax = fax
        self.fax_renderer = fax_renderer
        self.lines = lines
        self.loop = loop
        self.worker_id = worker_id
        self.outcomes = outcomes
        self.gate = gate
        self._paused_cache: tuple[float, dict[str, Pause]] | None = None
        self.clock = clock
        #: at most one letter of this process between DATA and its recorded `sent` (window.py)
        self.window = SendWindow()

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
            return
        context = {
            "delivery": claim.id,
            "appeal": claim.appeal_id,
            "campaign": claim.campaign,
            "section": claim.section,
            "target": claim.target,
            "channel": claim.channel,
            "attempt": claim.attempt,
        }
        log.info("delivery.sending", **context)
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
        finished = max(self.clock(), now)
        self.ledger.lifecycle.finish(claim, result, worker=self.worker_id, started_at=now, now=finished)
        # The outcome is committed: the next letter of this process may start its DATA.
        self.window.close()
        if result.flag_number:
            self.ledger.controls.flag_number(claim.recipient, result.text or "no fax tone", claim.id, finished)
            log.error("fax.number_flagged", **context, reason=result.text)
        level = log.error if result.outcome == Outcome.OPERATIONAL else log.info
        level(
            EVENTS.get(result.state, "delivery.retry_scheduled"),
            **context,
            outcome=result.outcome,
            code=result.code,
            reason=result.text if result.state not in (State.SENT, State.DELIVERED) else None,
            next_attempt_at=result.next_attempt_at.isoformat() if result.next_attempt_at else None,
            remote_id=result.remote_id,
            gateway=result.gateway,
            pages=result.pages,
            line_seconds=result.line_seconds,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
            queued_to_sent_ms=round((finished - claim.queued_at).total_seconds() * 1000, 1)
            if claim.queued_at and result.state in (State.SENT, State.DELIVERED)
            else None,
        )

    def _paused(self) -> dict[str, Pause]:
        """Paused channels, read at most once a second: a pause matters within seconds, and the
        hot path should not pay a query per letter for it."""
        now = time.monotonic()
        if self._paused_cache is None or now - self._paused_cache[0] > 1.0:
            self._paused_cache = (now, self.ledger.controls.paused_channels())
        return self._paused_cache[1]

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
        # Closed by an operator since the letter was claimed (the close cancels waiting letters;
        # this one was already in a worker's hands).
        closure = self.ledger.controls.closure(campaign.id)
        if closure is not None:
            return Result(Event.CANCELLED, "cancelled", text=f"campaign closed: {closure.reason}")
        deadline = self.catalog.deadline_at(campaign.id, section.code)
        if now >= deadline:
            return Result(Event.EXPIRED, "expired", text=f"campaign deadline {deadline.isoformat()} passed")
        if self.settings.live and campaign.sandbox_only:
            return self.outcomes.operational(
                OperationalError(f"campaign {campaign.id!r} is sandbox-only: its targets are example data"), now=now
            )
        target = self.catalog.target(claim.campaign, claim.section, claim.target)
        # the day it is where the letter arrives
        day = now.astimezone(ZoneInfo(target.timezone)).date()
        if claim.kind == "digest":
            signers = self.ledger.schedule.digest_signers(claim.id)
            if not signers:
                return Result(Event.CANCELLED, "cancelled", text="none of the digest's letters is waiting any more")
            # The section signs a digest and takes the replies; the supporters are listed below it.
            sender = Sender("", str(section.sender.address))
            request = LetterRequest(
                campaign=campaign,
                section=section,
                target=target,
                language=claim.language,
                supporter=Supporter(section.sender.name, str(section.sender.address)),
                message=None,
                date=day,
                signers=tuple(Supporter(s.name, s.email, s.city, s.country) for s in signers),
            )
        else:
            assert claim.appeal_id is not None  # every letter but a digest belongs to an appeal
            supporter = self.ledger.views.supporter(claim.appeal_id)
            if supporter is None:
                return Result(Event.FAILED, Outcome.PERMANENT, text="the supporter's data was purged before sending")
            sender = Sender(supporter.name, supporter.email)
            request = LetterRequest(
                campaign=campaign,
                section=section,
                target=target,
                language=claim.language,
                supporter=Supporter(supporter.name, supporter.email, supporter.city, supporter.country),
                message=supporter.message,
                date=day,
            )
        channel_key = f"{claim.channel}:{claim.section}"
        try:
            paused = self._paused().get(channel_key)
            if paused is not None:
                # Trust the cache only for "not paused": a resume must take effect at once, not
                # after a stale cache has held the letter back for another pause interval.
                self._paused_cache = None
                paused = self._paused().get(channel_key)
            if paused is not None:
                raise DeferredError(
                    f"channel {channel_key} is paused ({paused.reason}); `dispatcher channel resume {channel_key}`",
                    retry_after=self.outcomes.retry.operational_pause_seconds,
                )
            if self.gate is not None:
                # Office hours and the recipient's caps: a letter that may not go now is deferred.
                provider, provider_rates = _provider(section, claim.channel)
                self.gate.admit(
                    target=target,
                    channel=claim.channel,
                    recipient=claim.recipient,
                    token=f"{claim.id}:{claim.attempt}",
                    now=now,
                    provider=provider,
                    provider_rates=provider_rates,
                )
            try:
                if claim.channel == "email":
                    return self._send_email(claim, section, target, sender, request)
                if claim.channel == "fax" and self.fax is not None:
                    return self._send_fax(claim, section, request, now, deadline)
            except ChannelFault as fault:
                # The relay or gateway refuses us (credentials, funds, our sender): pause the
                # channel so its other letters wait instead of each hitting the same wall.
                if self.ledger.controls.pause_channel(channel_key, str(fault.error), now):  # code and text
                    log.error("channel.paused", channel=channel_key, reason=fault.error.message, code=fault.error.code)
                self._paused_cache = None
                raise fault.error from None
            # Not the letter's fault: it waits for a worker that has the channel, like any pause.
            raise OperationalError(f"no {claim.channel} channel is available in this worker")
        except DeliveryError as exc:
            return self.outcomes.of_error(
                exc, attempt=claim.attempt, now=now, deadline=deadline, created_at=claim.created_at
            )
        except (TemplateMissing, jinja2.TemplateError) as exc:
            # A deployment fault (a letter template missing or broken), not the letter's: pause it.
            return self.outcomes.operational(
                OperationalError(f"letter cannot be rendered: {type(exc).__name__}: {exc}"), now=now
            )

    def _send_email(
        self, claim: Claim, section: Section, target: Target, sender: Sender, request: LetterRequest
    ) -> Result:
        rendered = self.renderer.render_email(request)
        message = build_message(
            delivery_id=claim.id,
            section=section,
            to_name=target.name,
            to_address=claim.recipient,
            supporter_name=sender.name,
            supporter_email=sender.reply_to,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            language=rendered.language,
            date=self.clock(),
            # the Message-ID planned at intake: the stable key of this letter on every try
            message_id=claim.message_id,
        )
        with channel_faults():
            sent = self.loop.run(
                self.email.send(message, section=section, recipient=claim.recipient, window=self.window.ticket()),
                timeout=SEND_TIMEOUT_SECONDS,
            )
        return Result(Event.SENT, Outcome.SENT, code=sent.code, text=sent.text, remote_id=sent.remote_id)

    def _fax_result(self, report: FaxReport, claim: Claim, now: datetime, deadline: datetime) -> Result:
        if report.status is FaxStatus.DELIVERED:
            result = Result(Event.DELIVERED, Outcome.SENT, text="delivered")
        elif report.status is FaxStatus.FAILED:
            if report.failure is not None and report.failure.kind is FailureKind.DOCUMENT_REJECTED:
                # Our PDF or TIFF was refused: a bug on our side, never just a letter's bad luck.
                log.error(
                    "fax.document_rejected",
                    delivery=claim.id,
                    gateway=report.gateway,
                    code=report.failure.code,
                    reason=report.failure.text,
                )
            error = report.failure.error() if report.failure else TransientError("failed without a reason")
            result = self.outcomes.of_error(
                error, attempt=claim.attempt, now=now, deadline=deadline, created_at=claim.created_at
            )
        else:
            result = Result(Event.SENT, Outcome.SENT, code=report.raw_status, text=f"accepted by {report.gateway}")
        return replace(
            result,
            remote_id=report.remote_id,
            gateway=report.gateway,
            pages=report.pages,
            line_seconds=report.duration_s,
        )

    def _send_fax(
        self,
        claim: Claim,
        section: Section,
        request: LetterRequest,
        now: datetime,
        deadline: datetime,
    ) -> Result:
        flagged = self.ledger.controls.flagged(claim.recipient)
        if flagged is not None:
            raise OperationalError(f"number flagged for an operator ({flagged}); clear it to resume")
        assert self.lines is not None and self.fax_renderer is not None
        if not self.lines.take(claim.recipient, claim.id):
            raise DeferredError(
                "another fax to this number is in flight", retry_after=self.settings.fax_line_wait_seconds
            )
        keep_line = False
        try:
            if claim.attempt > 1:
                # No gateway has an idempotency key: an earlier try's fax may exist although its
                # answer was lost or its worker died. Adopt it rather than fax the letter twice.
                earlier = self.loop.run(self.fax.find_by_tag(claim.id, section=section), timeout=FAX_TIMEOUT_SECONDS)
                if earlier is not None and earlier.status is not FaxStatus.FAILED:
                    keep_line = not earlier.final
                    return self._fax_result(earlier, claim, now, deadline)
            document = self.fax_renderer.render(request, sent_at=now)
            fax_settings = section.fax
            job = FaxJob(
                tag=claim.id,
                to_number=claim.recipient,
                pdf=document.pdf,
                tiff=document.tiff,
                pages=document.pages,
                from_number=fax_settings.from_number if fax_settings else None,
                station_id=fax_settings.station_id if fax_settings else None,
            )
            with channel_faults():
                report = self.loop.run(self.fax.send(job, section=section), timeout=FAX_TIMEOUT_SECONDS)
            # Accepted by a gateway that calls later: the line stays ours until its final webhook.
            keep_line = not report.final
            return self._fax_result(report, claim, now, deadline)
        finally:
            if not keep_line:
                self.lines.give_back(claim.recipient, claim.id)
