"""Gateway reports applied to the ledger, and the one-fax-per-line lock, against a real Redis
and a real ledger: duplicates, late and out-of-order events leave the right final state."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis

from dispatcher.channels.base import Status
from dispatcher.channels.fax.base import FailureKind, FaxFailure, FaxReport, FaxStatus
from dispatcher.channels.fax.channel import as_report
from dispatcher.ledger.lifecycle import Result
from dispatcher.ledger.states import Event
from dispatcher.policy.lines import Lines
from dispatcher.queue.reports import ReportApplier
from tests.conftest import appeal_body

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def lines(service) -> Lines:
    return Lines(redis.Redis.from_url(service.settings.redis_url), service.settings.redis_namespace)


class FaxReports:
    """Gateway reports as the webhook route hands them over: read by the fax channel, applied to
    the ledger by the report applier."""

    def __init__(self, service, lines: Lines):
        self.applier = ReportApplier(
            catalog=service.catalog,
            ledger=service.ledger,
            outcomes=service.outcomes,
            channels=service.channels,
            lines=lines,
        )

    def apply(self, found: FaxReport) -> str:
        return self.applier.apply("fax", as_report(found, unsettled=Status.PENDING))


def report(tag: str, remote_id: str, status: FaxStatus, *, failure: FaxFailure | None = None, pages=None, raw=None):
    return FaxReport(
        gateway="testgw",
        remote_id=remote_id,
        status=status,
        tag=tag,
        pages=pages,
        duration_s=None if pages is None else 40.0 * pages,
        failure=failure,
        occurred_at=datetime.now(UTC),
        raw_status=raw or status.value,
    )


def fax_sent_via_gateway(service, remote_id: str) -> tuple[str, str]:
    """A ch appeal whose first fax was accepted by a gateway (state sent, waiting for its webhook)."""
    body = appeal_body(section="ch", language="de")
    body["supporter"]["country"] = "CH"
    accepted = service.intake.submit(body)
    delivery = next(d for d in accepted.deliveries if d.channel == "fax")
    now = datetime.now(UTC)
    claim = service.ledger.lifecycle.claim(delivery.id, "w1", now)
    assert claim is not None
    service.ledger.lifecycle.finish(
        claim, Result(Event.SENT, "sent", remote_id=remote_id, gateway="testgw"), worker="w1", started_at=now, now=now
    )
    return delivery.id, claim.recipient


def test_line_is_held_by_one_fax_at_a_time(lines):
    number = f"+4420794600{uuid.uuid4().int % 100:02d}"
    assert lines.take(number, "dl_a")
    assert not lines.take(number, "dl_b")
    assert lines.take(number, "dl_a")  # the holder may take it again (a retry after a crash)
    assert not lines.give_back(number, "dl_b")  # only the holder gives it back
    assert lines.holder(number) == "dl_a"
    assert lines.give_back(number, "dl_a")
    assert lines.take(number, "dl_b")


def test_line_frees_itself_when_its_holder_dies(lines):
    number = f"+4420794601{uuid.uuid4().int % 100:02d}"
    assert lines.take(number, "dl_dead", hold_seconds=0.2)
    import time

    time.sleep(0.3)
    assert lines.take(number, "dl_next")


def test_delivered_report_settles_the_letter_with_its_fax_facts(service, lines):
    applier = FaxReports(service, lines)
    delivery_id, number = fax_sent_via_gateway(service, "fx-1")
    lines.take(number, delivery_id)
    assert applier.apply(report(delivery_id, "fx-1", FaxStatus.QUEUED)) == "ignored: not final"
    assert applier.apply(report(delivery_id, "fx-1", FaxStatus.DELIVERED, pages=3)) == "applied"
    view = next(
        d
        for d in service.ledger.views.appeal(_appeal_of(service, delivery_id)).as_json()["deliveries"]
        if d["id"] == delivery_id
    )
    assert view["state"] == "delivered"
    assert view["pages"] == 3 and view["line_seconds"] == 120.0
    assert lines.holder(number) is None  # the line is free for the next fax
    # a duplicate, and a late progress event, change nothing
    assert applier.apply(report(delivery_id, "fx-1", FaxStatus.DELIVERED, pages=3)).startswith("ignored")
    assert applier.apply(report(delivery_id, "fx-1", FaxStatus.SENDING)).startswith("ignored")
    assert service.ledger.views.state_of(delivery_id) == "delivered"


def test_failure_arriving_after_delivered_does_not_move_it_back(service, lines):
    applier = FaxReports(service, lines)
    delivery_id, _ = fax_sent_via_gateway(service, "fx-2")
    applier.apply(report(delivery_id, "fx-2", FaxStatus.DELIVERED, pages=2))
    busy = FaxFailure(FailureKind.BUSY, code="user_busy", text="line busy")
    assert applier.apply(report(delivery_id, "fx-2", FaxStatus.FAILED, failure=busy)).startswith("ignored")
    assert service.ledger.views.state_of(delivery_id) == "delivered"


def test_busy_failure_schedules_a_new_try(service, lines):
    applier = FaxReports(service, lines)
    delivery_id, _ = fax_sent_via_gateway(service, "fx-3")
    busy = FaxFailure(FailureKind.BUSY, code="user_busy", text="line busy")
    reported = datetime.now(UTC)
    assert applier.apply(report(delivery_id, "fx-3", FaxStatus.FAILED, failure=busy)) == "applied"
    view = _view(service, delivery_id)
    assert view["state"] == "planned"
    assert view["last_outcome"] == "transient" and view["last_code"] == "user_busy"
    # a later try (the tests' backoff is a fraction of a second: compared with the report's time)
    assert datetime.fromisoformat(view["next_attempt_at"]) > reported
    # the try's attempt row carries the final outcome
    assert [a.outcome for a in service.ledger.views.attempts(delivery_id)] == ["transient"]
    # a report about this (now superseded) fax arriving again changes nothing
    assert applier.apply(report(delivery_id, "fx-3", FaxStatus.DELIVERED)).startswith("ignored")


def test_report_about_an_earlier_try_is_ignored(service, lines):
    applier = FaxReports(service, lines)
    delivery_id, _ = fax_sent_via_gateway(service, "fx-new")
    assert applier.apply(report(delivery_id, "fx-old", FaxStatus.DELIVERED)) == "ignored: earlier try"
    assert service.ledger.views.state_of(delivery_id) == "sent"


def test_invalid_number_fails_at_once(service, lines):
    applier = FaxReports(service, lines)
    delivery_id, _ = fax_sent_via_gateway(service, "fx-4")
    bad = FaxFailure(FailureKind.INVALID_NUMBER, code="invalid_number", text="unallocated number")
    applier.apply(report(delivery_id, "fx-4", FaxStatus.FAILED, failure=bad))
    view = _view(service, delivery_id)
    assert view["state"] == "failed" and view["last_outcome"] == "permanent"


def test_no_fax_tone_on_the_last_try_flags_the_number(service, lines):
    applier = FaxReports(service, lines)
    delivery_id, number = fax_sent_via_gateway(service, "fx-5")
    silent = FaxFailure(FailureKind.NO_FAX_TONE, code="T0", text="timed out waiting for initial communication")
    # first try: retried after the long no-tone interval
    applier.apply(report(delivery_id, "fx-5", FaxStatus.FAILED, failure=silent))
    view = _view(service, delivery_id)
    assert view["state"] == "planned"
    wait = datetime.fromisoformat(view["next_attempt_at"]) - datetime.now(UTC)
    assert wait > timedelta(seconds=service.settings.fax_no_tone_interval_seconds - 5)
    # later tries, until the cap: the number is flagged for an operator and the letter fails
    for n in range(2, service.outcomes.no_tone_attempts + 1):
        claim = service.ledger.lifecycle.claim(delivery_id, "w1", datetime.now(UTC) + timedelta(days=1))
        assert claim is not None and claim.attempt == n
        now = datetime.now(UTC)
        service.ledger.lifecycle.finish(
            claim, Result(Event.SENT, "sent", remote_id=f"fx-5.{n}"), worker="w1", started_at=now, now=now
        )
        applier.apply(report(delivery_id, f"fx-5.{n}", FaxStatus.FAILED, failure=silent))
    view = _view(service, delivery_id)
    assert view["state"] == "failed"
    assert "flagged" in view["last_text"]
    assert service.ledger.controls.flagged(number) is not None


def _appeal_of(service, delivery_id: str) -> str:
    from sqlalchemy import select

    from dispatcher.ledger.models import Delivery

    with service.ledger.session() as s:
        return s.scalar(select(Delivery.appeal_id).where(Delivery.id == delivery_id))


def _view(service, delivery_id: str) -> dict:
    return next(
        d
        for d in service.ledger.views.appeal(_appeal_of(service, delivery_id)).as_json()["deliveries"]
        if d["id"] == delivery_id
    )


def test_rejected_document_fails_at_once_and_loudly(service, lines):
    from structlog.testing import capture_logs

    applier = FaxReports(service, lines)
    delivery_id, _ = fax_sent_via_gateway(service, "fx-6")
    rejected = FaxFailure(FailureKind.DOCUMENT_REJECTED, code="file_too_big", text="the file exceeds the limit")
    with capture_logs() as logs:
        applier.apply(report(delivery_id, "fx-6", FaxStatus.FAILED, failure=rejected))
    view = _view(service, delivery_id)
    assert view["state"] == "failed" and view["last_outcome"] == "permanent"
    [alarm] = [e for e in logs if e["event"] == "fax.document_rejected"]
    assert alarm["log_level"] == "error" and alarm["code"] == "file_too_big"
