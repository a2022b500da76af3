"""An operator's hand on one letter — retry now, cancel, hand back — through the state table,
audited in the same transaction, refused cleanly when the letter moved meanwhile or may not go
again. The retry is watched end to end: a real worker sends the retried letter to the real SMTP
test server."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from dispatcher.app import Service
from dispatcher.ledger.actions import CANCEL, HAND_BACK, RETRY, ActionRefused
from dispatcher.ledger.lifecycle import Result
from dispatcher.ledger.models import Appeal, Delivery
from dispatcher.ledger.states import Event, State
from tests.conftest import Running, email_letters, enqueue, make_settings, wait_for
from tests.support.services import RedisServer

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
CAMPAIGN = "UA-002-19-DEMO"


def now() -> datetime:
    return datetime.now(UTC)


def deadline(service: Service, section: str = "us") -> datetime:
    return service.catalog.deadline_at(CAMPAIGN, section)


def failed_letter(service: Service) -> str:
    """A letter whose one try failed for good (recorded as a worker records it)."""
    [letter] = email_letters(service, 1)
    claim = service.ledger.lifecycle.claim(letter, "w1", now())
    assert claim is not None
    moved = service.ledger.lifecycle.finish(
        claim,
        Result(Event.FAILED, "transient", code="451", text="gave up after transient failures (limit: 1 tries)"),
        worker="w1",
        started_at=now(),
        now=now(),
    )
    assert moved == State.FAILED
    return letter


def audit_of(service: Service, letter: str) -> list[tuple[str, str, str | None, str | None]]:
    return [(e.actor, e.action, e.reason, e.detail) for e in service.ledger.audit.entries(target_id=letter)]


@pytest.fixture
def one_try_service(
    tmp_path: Path, database_url: str, redis_server: RedisServer, smtp, environ: dict[str, str]
) -> Iterator[Service]:
    """Letters give up after one transient failure: a failed letter in one try."""
    settings = make_settings(
        tmp_path, database_url=database_url, redis_url=redis_server.url, smtp_port=smtp.port, retry_max_attempts=1
    )
    svc = Service(settings, environ=environ)
    svc.ledger.migrate()
    yield svc
    svc.ledger.dispose()


@SQLITE
def test_a_failed_letter_retried_by_an_operator_is_sent_by_a_real_worker(one_try_service, smtp):
    service = one_try_service
    [letter] = email_letters(service, 1)
    smtp.script_rcpt([(451, "4.7.1 Please try again later")])
    with Running(service):
        enqueue(service, [letter])
        wait_for(lambda: service.ledger.views.state_of(letter) == State.FAILED)
        assert smtp.messages == []

        done = service.ledger.actions.retry_now(
            letter, actor="olga", reason="the relay is fixed", now=now(), deadline=deadline(service), expected="failed"
        )
        assert (done.before, done.after, done.enqueue) == (State.FAILED, State.QUEUED, True)
        service.enqueuer.send([letter])
        wait_for(lambda: service.ledger.views.state_of(letter) == State.SENT)
    [received] = smtp.messages
    with service.ledger.session() as s:
        message_id = s.get(Delivery, letter).message_id  # type: ignore[union-attr]
    assert received.message["Message-ID"] == message_id  # the same letter, not a new one
    assert [(a.outcome, a.code) for a in service.ledger.views.attempts(letter)] == [
        ("transient", "451"),
        ("sent", "250"),
    ]
    assert audit_of(service, letter) == [("olga", RETRY, "the relay is fixed", "failed → queued")]


def test_retry_now_of_a_letter_waiting_in_backoff_makes_it_due_now(service):
    [letter] = email_letters(service, 1)
    later = now() + timedelta(hours=2)
    with service.ledger.session() as s:
        s.execute(update(Delivery).where(Delivery.id == letter).values(next_attempt_at=later, attempts=1))
    done = service.ledger.actions.retry_now(
        letter, actor="olga", reason="line fixed", now=now(), deadline=deadline(service)
    )
    assert (done.before, done.after) == (State.PLANNED, State.QUEUED)
    view = service.ledger.views.delivery(letter)
    assert view is not None and view.next_attempt_at is not None and view.next_attempt_at < later
    # its first and only try is still to come: the backoff's tries count is kept
    assert view.attempts == 1


@SQLITE
def test_retry_is_refused_with_its_reason_and_nothing_is_written(service):
    closed, late, erased, suppressed, sent = (failed_letter(service) for _ in range(5))
    actions = service.ledger.actions

    def refused(letter: str, code: str, **kw) -> str:
        with pytest.raises(ActionRefused) as caught:
            actions.retry_now(letter, actor="olga", reason="again", now=kw.get("at", now()), deadline=deadline(service))
        assert caught.value.code == code
        assert service.ledger.views.state_of(letter) == State.FAILED
        assert audit_of(service, letter) == []
        return str(caught.value)

    # past the deadline
    assert "ended for section us" in refused(late, "deadline", at=deadline(service) + timedelta(seconds=1))
    # the supporter's data is gone: the letter cannot be written again
    with service.ledger.session() as s:
        appeal = s.get(Delivery, erased).appeal_id  # type: ignore[union-attr]
        s.execute(update(Appeal).where(Appeal.id == appeal).values(supporter_name=None, supporter_email=None))
    assert "erased or purged" in refused(erased, "erased")
    # its address is known to bounce
    view = service.ledger.views.delivery(suppressed)
    assert view is not None
    service.ledger.suppressions.add("email", view.recipient.upper(), reason="bounced", now=now())
    assert "remove the suppression first" in refused(suppressed, "suppressed")
    service.ledger.suppressions.remove("email", view.recipient)
    # a delivered letter never goes again
    with service.ledger.session() as s:
        s.execute(update(Delivery).where(Delivery.id == sent).values(state=State.DELIVERED))
    with pytest.raises(ActionRefused, match="a delivered letter cannot be retried") as caught:
        actions.retry_now(sent, actor="olga", reason="again", now=now(), deadline=deadline(service))
    assert caught.value.code == "not_allowed"
    # a closed campaign, closed last of all: it cancels nothing that failed
    service.ledger.controls.close_campaign(CAMPAIGN, "the detainee was released", now())
    assert "is closed: the detainee was released" in refused(closed, "closed")
    assert "is closed" in refused(suppressed, "closed")


def test_cancel_a_waiting_letter_with_the_operators_reason(service):
    [letter] = email_letters(service, 1)
    done = service.ledger.actions.cancel(letter, actor="olga", reason="sent by post instead", now=now())
    assert (done.before, done.after, done.enqueue) == (State.PLANNED, State.CANCELLED, False)
    view = service.ledger.views.delivery(letter)
    assert view is not None and view.last_text == "cancelled by olga: sent by post instead"
    assert audit_of(service, letter) == [("olga", CANCEL, "sent by post instead", "planned → cancelled")]
    # a message of it still on the queue finds nothing to claim
    assert service.ledger.lifecycle.claim(letter, "w1", now()) is None
    with pytest.raises(ActionRefused, match="a cancelled letter cannot be cancelled") as caught:
        service.ledger.actions.cancel(letter, actor="olga", reason="twice", now=now())
    assert caught.value.code == "not_allowed"


def test_an_action_on_a_letter_that_moved_meanwhile_is_refused(service):
    """The operator saw it planned; a worker claimed it before the click: nothing happens."""
    [letter] = email_letters(service, 1)
    assert service.ledger.lifecycle.claim(letter, "w1", now()) is not None
    with pytest.raises(ActionRefused, match="it was planned, it is sending now") as caught:
        service.ledger.actions.cancel(letter, actor="olga", reason="stop", now=now(), expected="planned")
    assert caught.value.code == "moved"
    assert service.ledger.views.state_of(letter) == State.SENDING
    assert audit_of(service, letter) == []
    with pytest.raises(ActionRefused, match="no letter dl-nope") as caught:
        service.ledger.actions.cancel("dl-nope", actor="olga", reason="stop", now=now())
    assert caught.value.code == "not_found"


def test_hand_back_takes_a_stuck_letter_from_its_worker(service):
    [letter] = email_letters(service, 1)
    claim = service.ledger.lifecycle.claim(letter, "w-hung", now())
    assert claim is not None
    done = service.ledger.actions.hand_back(letter, actor="olga", reason="worker hung", now=now(), expected="sending")
    assert (done.before, done.after, done.enqueue) == (State.SENDING, State.QUEUED, True)
    [attempt] = service.ledger.views.attempts(letter)
    assert attempt.outcome == "transient" and attempt.worker == "w-hung"
    assert attempt.text is not None and "handed back by operator olga" in attempt.text
    assert audit_of(service, letter) == [("olga", HAND_BACK, "worker hung", "sending → queued")]
    # the hung worker comes back to life and reports: its try is recorded, nothing moves
    late = service.ledger.lifecycle.finish(
        claim, Result(Event.SENT, "sent", code="250"), worker="w-hung", started_at=now(), now=now()
    )
    assert late is None
    assert service.ledger.views.state_of(letter) == State.QUEUED


@SQLITE
def test_a_letter_handed_back_after_its_campaign_closed_is_cancelled(service):
    [letter] = email_letters(service, 1)
    assert service.ledger.lifecycle.claim(letter, "w-hung", now()) is not None
    service.ledger.controls.close_campaign(CAMPAIGN, "released", now())
    done = service.ledger.actions.hand_back(letter, actor="olga", reason="worker hung", now=now())
    assert (done.after, done.enqueue) == (State.CANCELLED, False)
