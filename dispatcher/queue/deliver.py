"""What the deliver actor does with one delivery id: claim ▶ check ▶ render ▶ send ▶ record.

The claim is a compare-and-set in the ledger, so a redelivered message for a letter that is
already sent, or being sent by another worker, does nothing. Every outcome is recorded as an
attempt and one state change, and logged as one event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import jinja2

from dispatcher.channels.email.channel import EmailChannel
from dispatcher.channels.email.message import build_message
from dispatcher.config.catalog import Catalog
from dispatcher.errors import DeliveryError, OperationalError, Outcome, TransientError
from dispatcher.ledger.models import State, utcnow
from dispatcher.ledger.store import Claim, Ledger, SupporterData
from dispatcher.logging import get_logger
from dispatcher.queue.loop import LoopThread
from dispatcher.render.letters import LetterRequest, Renderer, Supporter, TemplateMissing
from dispatcher.retry import RetryPolicy
from dispatcher.settings import Settings

log = get_logger("dispatcher.delivery")

#: a send that takes longer than this is abandoned and retried (the SMTP pool has its own timeouts)
SEND_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class Result:
    state: State
    outcome: str
    code: int | str | None = None
    text: str | None = None
    next_attempt_at: datetime | None = None
    remote_id: str | None = None
    counts_as_try: bool = True


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
        retry: RetryPolicy | None = None,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.settings = settings
        self.catalog = catalog
        self.ledger = ledger
        self.renderer = renderer
        self.email = email
        self.loop = loop
        self.worker_id = worker_id
        self.retry = retry or RetryPolicy(
            base_seconds=settings.retry_base_seconds, max_attempts=settings.retry_max_attempts
        )
        self.clock = clock

    def __call__(self, delivery_id: str) -> None:
        now = self.clock()
        claim = self.ledger.claim(delivery_id, self.worker_id, now)
        if claim is None:
            log.debug("delivery.skipped", delivery=delivery_id, state=self.ledger.state_of(delivery_id))
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
            result = self._transient(claim, now, TransientError(f"internal error: {type(exc).__name__}"))
        finished = self.clock()
        if finished < now:
            finished = now
        self.ledger.finish(
            claim,
            worker=self.worker_id,
            state=result.state,
            outcome=result.outcome,
            started_at=now,
            now=finished,
            code=result.code,
            text=result.text,
            next_attempt_at=result.next_attempt_at,
            remote_id=result.remote_id,
            counts_as_try=result.counts_as_try,
        )
        event = {
            State.SENT: "delivery.sent",
            State.FAILED: "delivery.failed",
            State.EXPIRED: "delivery.expired",
            State.CANCELLED: "delivery.cancelled",
        }.get(result.state, "delivery.retry_scheduled")
        level = log.error if result.outcome == Outcome.OPERATIONAL else log.info
        level(
            event,
            **context,
            outcome=result.outcome,
            code=result.code,
            reason=result.text if result.state != State.SENT else None,
            next_attempt_at=result.next_attempt_at.isoformat() if result.next_attempt_at else None,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
            queued_to_sent_ms=round((finished - claim.queued_at).total_seconds() * 1000, 1)
            if claim.queued_at and result.state == State.SENT
            else None,
        )

    # ------------------------------------------------------------------ one try

    def _attempt(self, claim: Claim, now: datetime) -> Result:
        campaign = self.catalog.campaigns.get(claim.campaign)
        section = self.catalog.sections.get(claim.section)
        if campaign is None or section is None or claim.campaign not in section.campaigns:
            return self._operational(
                now,
                OperationalError(f"campaign {claim.campaign!r} / section {claim.section!r} is no longer configured"),
            )
        if campaign.status == "closed":
            return Result(
                State.CANCELLED, "cancelled", text=f"campaign closed: {campaign.closed_reason or 'no reason given'}"
            )
        deadline = self.catalog.deadline_at(campaign.id, section.code)
        if now >= deadline:
            return Result(State.EXPIRED, "expired", text=f"campaign deadline {deadline.isoformat()} passed")
        if self.settings.live and campaign.sandbox_only:
            return self._operational(
                now, OperationalError(f"campaign {campaign.id!r} is sandbox-only: its targets are example data")
            )
        supporter = self.ledger.supporter(claim.appeal_id)
        if supporter is None:
            return Result(State.FAILED, Outcome.PERMANENT, text="the supporter's data was purged before sending")
        try:
            if claim.channel == "email":
                return self._send_email(claim, supporter)
            # Not the letter's fault: it waits for a worker that has the channel, like any pause.
            raise OperationalError(f"no {claim.channel} channel is available in this worker")
        except TransientError as exc:
            return self._transient(claim, now, exc, deadline)
        except OperationalError as exc:
            return self._operational(now, exc)
        except DeliveryError as exc:  # permanent
            return Result(State.FAILED, exc.outcome, code=exc.code, text=exc.message)
        except (TemplateMissing, jinja2.TemplateError) as exc:
            # A deployment fault (a letter template missing or broken), not the letter's: pause it.
            return self._operational(now, OperationalError(f"letter cannot be rendered: {type(exc).__name__}: {exc}"))

    def _send_email(self, claim: Claim, supporter: SupporterData) -> Result:
        campaign = self.catalog.campaign(claim.campaign)
        section = self.catalog.section(claim.section)
        target = self.catalog.target(claim.campaign, claim.section, claim.target)
        rendered = self.renderer.render_email(
            LetterRequest(
                campaign=campaign,
                section=section,
                target=target,
                language=claim.language,
                supporter=Supporter(supporter.name, supporter.email, supporter.city, supporter.country),
                message=supporter.message,
                date=self.clock().date(),
            )
        )
        message = build_message(
            delivery_id=claim.id,
            section=section,
            to_name=target.name,
            to_address=claim.recipient,
            supporter_name=supporter.name,
            supporter_email=supporter.email,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            language=rendered.language,
            date=self.clock(),
        )
        # The Message-ID planned at intake is the stable key of this letter on every try.
        message.replace_header("Message-ID", claim.message_id)
        sent = self.loop.run(
            self.email.send(message, section=section, recipient=claim.recipient), timeout=SEND_TIMEOUT_SECONDS
        )
        return Result(State.SENT, Outcome.SENT, code=sent.code, text=sent.text, remote_id=sent.remote_id)

    # ------------------------------------------------------------------ outcomes

    def _transient(self, claim: Claim, now: datetime, exc: DeliveryError, deadline: datetime | None = None) -> Result:
        if deadline is None:
            deadline = self.catalog.deadline_at(claim.campaign, claim.section)
        due = self.retry.next_try(claim.attempt, now, deadline, exc.retry_after)
        if due is None:
            why = "deadline" if claim.attempt < self.retry.max_attempts else f"{claim.attempt} tries"
            return Result(
                State.FAILED,
                Outcome.TRANSIENT,
                code=exc.code,
                text=f"gave up (transient failures until {why}): {exc.message}",
            )
        return Result(State.PLANNED, Outcome.TRANSIENT, code=exc.code, text=exc.message, next_attempt_at=due)

    def _operational(self, now: datetime, exc: DeliveryError) -> Result:
        # Our side is broken: the letter waits, it does not fail and the try does not count.
        due = now + timedelta(seconds=self.retry.operational_pause_seconds)
        return Result(
            State.PLANNED,
            Outcome.OPERATIONAL,
            code=exc.code,
            text=exc.message,
            next_attempt_at=due,
            counts_as_try=False,
        )
