"""Closing a campaign stops everything: letters waiting are cancelled at once, in every section,
and a letter that was in a worker's hands when the campaign closed is cancelled rather than tried
again, whatever its send then says. Real Redis, the real SMTP test server, the real worker.
(A fax settled after the close by its gateway's webhook: tests/test_fax_gateways_live.py.)"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import update
from structlog.testing import capture_logs

from dispatcher.ledger.models import Delivery
from tests.conftest import Running, appeal_body, wait_for
from tests.support.smtp import HANG

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
CAMPAIGN = "UA-002-19-DEMO"


def email_of(service, section: str = "us") -> str:
    body = appeal_body(section=section, language="de" if section == "ch" else "en")
    if section == "ch":
        body["supporter"]["country"] = "CH"
    accepted = service.intake.submit(body)
    return next(d.id for d in accepted.deliveries if d.channel == "email" or section == "ch")


@SQLITE
def test_a_letter_being_sent_when_the_campaign_closes_is_cancelled_not_retried(service, smtp):
    service.intake.enqueuer = None
    letter = email_of(service)
    elsewhere = email_of(service, "ch")  # another section's letter of the same campaign, waiting
    handle = service.worker(threads=1)
    processor = handle.processor
    # The relay takes its time over RCPT, and then fails the send as a transient error.
    processor.channels.get("email").send_timeout = 2.0
    smtp.script_rcpt([HANG])
    try:
        with capture_logs() as logs:
            sending = threading.Thread(target=processor, args=(letter,))
            sending.start()
            wait_for(lambda: service.ledger.views.state_of(letter) == "sending", timeout=10)
            wait_for(lambda: "RCPT" in smtp.commands, timeout=10)
            cancelled = service.ledger.controls.close_campaign(CAMPAIGN, "the detainee was released", datetime.now(UTC))
            assert cancelled is not None and cancelled >= 1  # the other section's letters, at once
            sending.join(30)
    finally:
        handle.loop.run(processor.channels.get("email").aclose(), timeout=10)
        handle.loop.stop()
    view = service.ledger.views.delivery(letter)
    assert view is not None and view.state == "cancelled"
    assert view.last_text == "campaign closed: the detainee was released"
    # the try that was under way is on record; none follows
    assert [a.outcome for a in service.ledger.views.attempts(letter)] == ["transient"]
    assert service.ledger.views.state_of(elsewhere) == "cancelled"
    # operators read what happened, not a retry that will never come
    [ended] = [e for e in logs if e.get("delivery") == letter and e["event"].startswith("delivery.") and "reason" in e]
    assert (ended["event"], ended["reason"]) == ("delivery.cancelled", "the campaign was closed meanwhile")


@SQLITE
def test_a_letter_left_waiting_by_a_race_with_the_close_is_cancelled_by_its_claim(service, smtp):
    service.intake.enqueuer = None
    letter = email_of(service)
    service.ledger.controls.close_campaign(CAMPAIGN, "resolved", datetime.now(UTC))
    # As an appeal accepted while its campaign was being closed would be (or, on PostgreSQL, a
    # retry that read the closures just before the close committed): waiting, campaign closed.
    with service.ledger.engine.begin() as conn:
        conn.execute(update(Delivery).where(Delivery.id == letter).values(state="planned"))
    assert service.ledger.lifecycle.claim(letter, "w1", datetime.now(UTC)) is None
    view = service.ledger.views.delivery(letter)
    assert view is not None and (view.state, view.last_text) == ("cancelled", "campaign closed: resolved")
    assert view.attempts == 0 and smtp.messages == []


@SQLITE
def test_after_a_close_no_letter_of_the_campaign_is_sent_in_any_section(service, smtp):
    service.intake.enqueuer = None
    letters = [email_of(service, section) for section in ("us", "ch", "us")]
    service.ledger.controls.close_campaign(CAMPAIGN, "resolved", datetime.now(UTC))
    with Running(service) as running:
        # the reconciler releases nothing and a stray message claims nothing
        service.enqueuer.send(letters)
        wait_for(lambda: running.reconciler.tick() == 0, timeout=5)
        for letter in letters:
            assert service.ledger.lifecycle.claim(letter, "another-worker", datetime.now(UTC)) is None
    assert {service.ledger.views.state_of(letter) for letter in letters} == {"cancelled"}
    assert smtp.messages == []
