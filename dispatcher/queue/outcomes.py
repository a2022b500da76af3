"""From a classified error to the letter's next state: one set of rules for the worker (errors
raised while sending) and for gateway webhooks (failures reported after a fax was accepted)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from dispatcher.channels.base import Report, Status
from dispatcher.errors import (
    Bounced,
    DeferredError,
    DeliveryError,
    OperationalError,
    Outcome,
    SuspectRecipient,
    TransientError,
)
from dispatcher.ledger.lifecycle import Result as TryResult
from dispatcher.ledger.states import Event
from dispatcher.retry import RetryPolicy


@dataclass(frozen=True)
class Result(TryResult):
    #: the recipient's address answered wrongly too often (a fax number without a fax tone): flag
    #: it for an operator
    flag_number: bool = False
    #: the far end refused the address itself for good: no channel of this kind writes to it again
    suppress: bool = False
    #: a deferral's reason (``DeferredError.reason``; ``operational`` when our side is broken):
    #: a fixed word for the metrics, not stored
    reason: str | None = None


@dataclass(frozen=True)
class Outcomes:
    retry: RetryPolicy
    #: tries in all at a recipient that answers wrongly (SuspectRecipient), before it is flagged
    no_tone_attempts: int = 3
    #: wait between those tries: a fax machine may be switched to voice for the day
    no_tone_interval_seconds: float = 3600.0

    def of_report(
        self, report: Report, *, attempt: int, now: datetime, deadline: datetime, created_at: datetime | None = None
    ) -> Result:
        """What a channel's report makes of a try, at send time or later: delivered, a failure
        classified as any other, or accepted (``sent``); with the far side's facts."""
        if report.status is Status.DELIVERED:
            result = Result(Event.DELIVERED, Outcome.SENT, text=report.text or "delivered")
        elif report.status is Status.FAILED:
            error = report.error or TransientError("failed without a reason")
            result = self.of_error(error, attempt=attempt, now=now, deadline=deadline, created_at=created_at)
        else:
            result = Result(Event.SENT, Outcome.SENT, code=report.code, text=report.text)
        return replace(
            result,
            remote_id=report.remote_id,
            gateway=report.provider,
            pages=report.pages,
            line_seconds=report.line_seconds,
        )

    def of_error(
        self, exc: DeliveryError, *, attempt: int, now: datetime, deadline: datetime, created_at: datetime | None = None
    ) -> Result:
        """``deadline`` is the campaign's; ``created_at`` (the letter's) bounds its tries by the
        retry policy's lifetime cap as well."""
        if isinstance(exc, SuspectRecipient):
            return self._no_tone(exc, attempt, now, self.retry.retry_until(created_at, deadline))
        if isinstance(exc, DeferredError):
            wait = exc.retry_after if exc.retry_after is not None else 60.0
            return Result(
                Event.DEFERRED,
                Outcome.DEFERRED,
                code=exc.code,
                text=exc.message,
                next_attempt_at=now + timedelta(seconds=wait),
                counts_as_try=False,
                reason=exc.reason,
            )
        if isinstance(exc, TransientError):
            return self.transient(exc, attempt=attempt, now=now, deadline=deadline, created_at=created_at)
        if isinstance(exc, OperationalError):
            return self.operational(exc, now=now)
        if isinstance(exc, Bounced):
            return Result(Event.BOUNCED, exc.outcome, code=exc.code, text=exc.message, suppress=exc.suppress)
        return Result(Event.FAILED, exc.outcome, code=exc.code, text=exc.message)

    def transient(
        self, exc: DeliveryError, *, attempt: int, now: datetime, deadline: datetime, created_at: datetime | None = None
    ) -> Result:
        until = self.retry.retry_until(created_at, deadline)
        due = self.retry.next_try(attempt, now, until, exc.retry_after)
        if due is None:
            if attempt >= self.retry.max_attempts:
                why = f"{attempt} tries"
            elif until < deadline:
                why = f"{self.retry.max_lifetime_seconds / 3600:g} hours of retrying"
            else:
                why = "the campaign deadline"
            return Result(
                Event.FAILED,
                Outcome.TRANSIENT,
                code=exc.code,
                text=f"gave up after transient failures (limit: {why}): {exc.message}",
            )
        return Result(Event.RETRY, Outcome.TRANSIENT, code=exc.code, text=exc.message, next_attempt_at=due)

    def operational(self, exc: DeliveryError, *, now: datetime) -> Result:
        # Our side is broken: the letter waits, it does not fail and the try does not count.
        return Result(
            Event.DEFERRED,
            Outcome.OPERATIONAL,
            code=exc.code,
            text=exc.message,
            next_attempt_at=now + timedelta(seconds=self.retry.operational_pause_seconds),
            counts_as_try=False,
            reason="operational",
        )

    def _no_tone(self, exc: SuspectRecipient, attempt: int, now: datetime, deadline: datetime) -> Result:
        due = now + timedelta(seconds=self.no_tone_interval_seconds)
        if attempt >= self.no_tone_attempts or due >= deadline:
            return Result(
                Event.FAILED,
                Outcome.TRANSIENT,
                code=exc.code,
                text=f"answered wrongly in {attempt} tries; recipient flagged for an operator ({exc.message})",
                flag_number=True,
            )
        return Result(Event.RETRY, Outcome.TRANSIENT, code=exc.code, text=exc.message, next_attempt_at=due)
