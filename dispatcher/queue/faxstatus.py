"""Gateway status reports (webhooks) applied to the ledger.

A report moves a letter only if it is final and about the fax the letter is currently waiting
on; everything else is logged and dropped. So duplicates, reports about an older try, and
events arriving out of order (``fax.sending.started`` after ``fax.delivered``) leave the right
final state. A failure is classified by the same rules as a failure during sending.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from dispatcher.channels.fax.base import FailureKind, FaxReport, FaxStatus
from dispatcher.channels.fax.lines import FaxLines
from dispatcher.config.catalog import Catalog
from dispatcher.errors import TransientError
from dispatcher.ledger.models import utcnow
from dispatcher.ledger.states import Event, State
from dispatcher.ledger.store import Ledger
from dispatcher.logging import get_logger
from dispatcher.queue.outcomes import Outcomes, Result

log = get_logger("dispatcher.fax.status")


class FaxStatusApplier:
    def __init__(
        self,
        *,
        catalog: Catalog,
        ledger: Ledger,
        outcomes: Outcomes,
        lines: FaxLines | None,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.catalog = catalog
        self.ledger = ledger
        self.outcomes = outcomes
        self.lines = lines
        self.clock = clock

    def apply(self, report: FaxReport) -> str:
        """Apply one report; returns what happened ("applied", "ignored: ...") for the log and tests."""
        context = {
            "gateway": report.gateway,
            "remote_id": report.remote_id,
            "status": report.raw_status or report.status,
        }
        if report.tag is None:
            log.warning("fax.report_ignored", **context, why="no tag")
            return "ignored: no tag"
        row = self.ledger.views.delivery(report.tag)
        if row is None:
            log.warning("fax.report_ignored", **context, delivery=report.tag, why="unknown delivery")
            return "ignored: unknown delivery"
        context["delivery"] = row.id
        if row.remote_id != report.remote_id:
            log.info("fax.report_ignored", **context, why="about an earlier try")
            return "ignored: earlier try"
        if not report.final:
            log.info("fax.progress", **context)
            return "ignored: not final"
        if row.state != State.SENT:
            log.info("fax.report_ignored", **context, why=f"delivery already {row.state}")
            return f"ignored: already {row.state}"
        now = self.clock()
        if report.status is FaxStatus.DELIVERED:
            moved = self.ledger.lifecycle.settle(
                row.id,
                report.remote_id,
                Result(Event.DELIVERED, "sent", text="delivered", pages=report.pages, line_seconds=report.duration_s),
                now=now,
            )
            flag = False
            next_at = None
            state = State.DELIVERED
        else:
            if report.failure is not None and report.failure.kind is FailureKind.DOCUMENT_REJECTED:
                log.error("fax.document_rejected", **context, code=report.failure.code, reason=report.failure.text)
            error = report.failure.error() if report.failure else TransientError("failed without a reason")
            deadline = self.catalog.deadline_at(row.campaign, row.section)
            result = self.outcomes.of_error(
                error, attempt=row.attempts, now=now, deadline=deadline, created_at=row.created_at
            )
            moved = self.ledger.lifecycle.settle(
                row.id,
                report.remote_id,
                replace(result, pages=report.pages, line_seconds=report.duration_s),
                now=now,
            )
            flag, next_at, state = result.flag_number, result.next_attempt_at, result.state
            if result.outcome == "operational" and moved:
                # the gateway refuses us (funds, credentials): the section's fax channel waits
                self.ledger.controls.pause_channel(f"fax:{row.section}", result.text or "operational failure", now)
                log.error("channel.paused", channel=f"fax:{row.section}", reason=result.text)
        if not moved:
            return "ignored: raced"
        if flag:
            self.ledger.controls.flag_number(row.recipient, "no fax tone", row.id, now)
            log.error("fax.number_flagged", **context)
        if self.lines is not None:
            self.lines.give_back(row.recipient, row.id)
        log.info(
            "delivery.delivered"
            if state == State.DELIVERED
            else ("delivery.failed" if state == State.FAILED else "delivery.retry_scheduled"),
            **context,
            pages=report.pages,
            line_seconds=report.duration_s,
            next_attempt_at=next_at.isoformat() if next_at else None,
            reason=None if report.failure is None else report.failure.text,
        )
        return "applied"
