"""A channel's later word on a letter it accepted (a gateway's webhook, the answer to a poll),
applied to the ledger.

A report moves a letter only if it is final and about the try the letter is waiting on;
everything else is logged and dropped. So duplicates, reports about an older try, and events
arriving out of order (``fax.sending.started`` after ``fax.delivered``) leave the right final
state. A failure is classified by the same rules as a failure during sending.

A final report that arrives while its letter is still being sent (the gateway's create answer
not yet recorded) is kept, not dropped: the gateway sends it only once. It is applied as soon as
the send is recorded (:meth:`ReportApplier.apply_parked`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from dispatcher.channels.base import Report, Status
from dispatcher.channels.registry import Channels
from dispatcher.config.catalog import Catalog
from dispatcher.errors import DeliveryError, DocumentRejected, Outcome, TransientError
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.states import State
from dispatcher.ledger.store import Ledger
from dispatcher.logging import get_logger
from dispatcher.metrics.instruments import ReportMetrics
from dispatcher.policy.lines import Lines
from dispatcher.queue.deliver import EVENTS, log_document_rejected
from dispatcher.queue.fallback import Fallback
from dispatcher.queue.outcomes import Outcomes

log = get_logger("dispatcher.reports")

#: what apply() answers for a report kept until its send is recorded
PARKED = "parked: the send is not recorded yet"


class ReportApplier:
    def __init__(
        self,
        *,
        catalog: Catalog,
        ledger: Ledger,
        outcomes: Outcomes,
        channels: Channels,
        lines: Lines | None,
        clock: Callable[[], datetime] = utcnow,
        metrics: ReportMetrics | None = None,
    ):
        self.catalog = catalog
        self.ledger = ledger
        self.outcomes = outcomes
        self.channels = channels
        self.lines = lines
        self.clock = clock
        self.fallback = Fallback(catalog=catalog, channels=channels, ledger=ledger)
        self.metrics = metrics

    def apply(self, channel: str, report: Report) -> str:
        """Apply one report; returns what happened ("applied", "parked: ...", "ignored: ...")
        for the log, the webhook's answer and tests."""
        answer = self._apply(channel, report)
        if self.metrics is not None and answer != "applied":  # an applied one is counted with its state
            self.metrics.reports.labels(channel, answer.split(":", 1)[0]).inc()
        return answer

    def _apply(self, channel: str, report: Report) -> str:
        context: dict[str, Any] = {
            "channel": channel,
            "gateway": report.provider,
            "remote_id": report.remote_id,
            "status": report.code or report.status.value,
        }
        if report.tag is None:
            log.warning(f"{channel}.report_ignored", **context, why="no tag")
            return "ignored: no tag"
        row = self.ledger.views.delivery(report.tag)
        if row is None or row.channel != channel:
            log.warning(f"{channel}.report_ignored", **context, delivery=report.tag, why="unknown delivery")
            return "ignored: unknown delivery"
        context["delivery"] = row.id
        if row.state == State.SENDING and report.final and report.remote_id and row.remote_id != report.remote_id:
            # Overtook the send's own answer: keep it for when the send is recorded.
            self.ledger.early_reports.park(row.id, channel, report.remote_id, _dumps(report), self.clock())
            log.info(f"{channel}.report_parked", **context)
            return PARKED
        if row.remote_id != report.remote_id:
            log.info(f"{channel}.report_ignored", **context, why="about an earlier try")
            return "ignored: earlier try"
        if not report.final:
            log.info(f"{channel}.progress", **context)
            return "ignored: not final"
        if row.state != State.SENT:
            log.info(f"{channel}.report_ignored", **context, why=f"delivery already {row.state}")
            return f"ignored: already {row.state}"
        now = self.clock()
        if isinstance(report.error, DocumentRejected):
            log_document_rejected(channel, report.error, **{k: v for k, v in context.items() if k != "channel"})
        deadline = self.catalog.deadline_at(row.campaign, row.section)
        result = self.outcomes.of_report(
            report, attempt=row.attempts, now=now, deadline=deadline, created_at=row.created_at
        )
        if row.kind == "letter":
            result = self.fallback.with_replan(
                result, campaign=row.campaign, section=row.section, target=row.target, channel=channel
            )
        state = self.ledger.lifecycle.settle(row.id, report.remote_id, result, now=now)
        if state is None:
            return "ignored: raced"
        self.fallback.record(result, delivery=row.id, channel=channel, recipient=row.recipient, now=now)
        if self.metrics is not None:
            self.metrics.reports.labels(channel, state.value).inc()
            self.metrics.line.record(channel, result.gateway, result.pages, result.line_seconds)
        if result.outcome == Outcome.OPERATIONAL:
            # the far side refuses us (funds, credentials): the section's channel waits
            key = f"{channel}:{row.section}"
            self.ledger.controls.pause_channel(key, result.text or "operational failure", now)
            log.error("channel.paused", channel=key, reason=result.text)
        if result.flag_number:
            self.ledger.controls.flag_number(row.recipient, result.text or "suspect recipient", row.id, now)
            log.error(f"{channel}.recipient_flagged", **context)
        if self.lines is not None and self.channels.kind(channel).one_at_a_time:
            self.lines.give_back(row.recipient, row.id)
        # (a closed campaign's letter is cancelled rather than retried)
        log.info(
            EVENTS.get(state, "delivery.retry_scheduled"),
            **context,
            pages=report.pages,
            line_seconds=report.line_seconds,
            next_attempt_at=result.next_attempt_at.isoformat() if result.next_attempt_at else None,
            reason=None if report.error is None else result.text,
            replacement=result.replan.id if result.replan is not None and state == result.state else None,
        )
        return "applied"

    def apply_parked(self, delivery_id: str | None = None) -> int:
        """Apply the kept reports of ``delivery_id`` (or of every letter no longer being sent);
        returns how many were applied. A report about a try that was not the one recorded is
        dropped as stale."""
        parked = self.ledger.early_reports.of(delivery_id) if delivery_id else self.ledger.early_reports.ready()
        done, applied = [], 0
        for kept in parked:
            answer = self.apply(kept.channel, _loads(kept.report))
            if answer == PARKED:
                continue  # still being sent (a worker's outcome is not recorded yet)
            done.append(kept.id)
            applied += answer == "applied"
        self.ledger.early_reports.drop(done)
        return applied


# -------------------------------------------------------------------------- keeping a report


def _error_classes() -> dict[str, type[DeliveryError]]:
    found: dict[str, type[DeliveryError]] = {}
    todo: list[type[DeliveryError]] = [DeliveryError]
    while todo:
        cls = todo.pop()
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        todo.extend(cls.__subclasses__())
    return found


def _dumps(report: Report) -> str:
    error = report.error
    return json.dumps(
        {
            "status": report.status.value,
            "remote_id": report.remote_id,
            "tag": report.tag,
            "code": report.code,
            "text": report.text,
            "provider": report.provider,
            "pages": report.pages,
            "line_seconds": report.line_seconds,
            "error": None
            if error is None
            else {
                "class": f"{type(error).__module__}.{type(error).__qualname__}",
                "message": error.message,
                "code": error.code,
            },
        }
    )


def _loads(text: str) -> Report:
    data = json.loads(text)
    error = None
    if data["error"] is not None:
        cls = _error_classes().get(data["error"]["class"], TransientError)
        error = cls(data["error"]["message"], code=data["error"]["code"])
    return Report(
        status=Status(data["status"]),
        remote_id=data["remote_id"],
        tag=data["tag"],
        code=data["code"],
        text=data["text"],
        error=error,
        provider=data["provider"],
        pages=data["pages"],
        line_seconds=data["line_seconds"],
    )
