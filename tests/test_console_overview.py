"""The console's overview after real letters: a worker sends us's emails to the test SMTP server
while ch's channel is paused; an operator of us sees us's letters only, an admin sees both, and
everyone sees the service's state (workers, the reconciler, the paused channel). With Redis away,
operators still sign in (attempts are then not counted) and the overview says so."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from dispatcher.ledger.states import LETTER_OUT
from tests.conftest import appeal_body, email_letters, wait_for
from tests.support.console import add_operator, row, sign_in

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def test_the_overview_counts_the_operators_sections_and_shows_the_service(service, smtp, running):
    service.ledger.controls.pause_channel("fax:ch", "gateway out of funds", datetime.now(UTC))
    sent = email_letters(service, 2)
    ch_letters = [d.id for d in service.intake.submit(appeal_body(section="ch", language="de")).deliveries]
    views = service.ledger.views
    wait_for(lambda: all(views.state_of(i) in LETTER_OUT for i in sent), timeout=30)
    wait_for(lambda: all((views.delivery(i).last_outcome or "") == "deferred" for i in ch_letters), timeout=30)
    wait_for(lambda: service.broker.client.get(f"{service.settings.redis_namespace}:reconciler:last_tick"))

    with TestClient(service.api()) as web:
        sign_in(web, add_operator(service, "operator", ("us",)))
        us = web.get("/console/").text
        web.cookies.clear()
        sign_in(web, add_operator(service, "admin"))
        everything = web.get("/console/").text

    # channel, then sent / delivered / failed / deferred in the last hour, then in the last day
    assert row(us, "email") == ["email", "2", "0", "0", "0", "2", "0", "0", "0"]
    assert row(us, "fax") is None  # us's faxes were cancelled; ch's are not us's
    assert row(us, "planned") is None
    assert row(everything, "email") == row(us, "email")
    assert row(everything, "fax") == ["fax", "0", "0", "0", "2", "0", "0", "0", "2"]
    assert row(everything, "planned") == ["planned", "2"]
    assert "Letters are counted for your sections only: us." in us

    for page in (us, everything):
        assert "fax:ch" in page  # a paused channel is everyone's business
        workers = row(page, "Workers alive")
        assert workers is not None and workers[1].startswith("1 ")
        assert row(page, "Reconciler holding the lease")[1] == running.reconciler.lease.identity
        assert row(page, "Reconciler's last tick")[1] != "never"
        assert row(page, "Waiting on the queue") == ["Waiting on the queue", "0"]


def test_letters_waiting_on_the_queue_and_nobody_to_take_them(service):
    from dispatcher.queue.status import queue_status
    from tests.conftest import enqueue

    before = datetime.now(UTC).replace(microsecond=0)
    enqueue(service, email_letters(service, 3))
    status = queue_status(service.broker.client, service.settings.redis_namespace)
    assert status.depth == 3
    assert status.oldest_at is not None and before <= status.oldest_at <= datetime.now(UTC)
    assert (status.workers_alive, status.reconciler, status.reconciler_tick, status.error) == ((), None, None, None)

    with TestClient(service.api()) as web:
        sign_in(web, add_operator(service, "viewer"))
        page = web.get("/console/").text
    assert row(page, "Waiting on the queue") == ["Waiting on the queue", "3"]
    assert row(page, "Workers alive")[1] == "0"
    assert row(page, "Reconciler holding the lease")[1] == "none: no reconciler runs"
    assert row(page, "queued") == ["queued", "3"]


def test_with_redis_away_operators_still_sign_in_and_are_told(settings, environ):
    from dispatcher.app import Service
    from tests.support.services import free_port

    service = Service(settings.but(redis_url=f"redis://127.0.0.1:{free_port()}/0"), environ=environ)
    service.ledger.migrate()
    try:
        with TestClient(service.api()) as web:
            assert sign_in(web, add_operator(service, "admin")).status_code == 303
            page = web.get("/console/").text
    finally:
        service.ledger.dispose()
    assert "Redis does not answer (ConnectionError): appeals are kept in the ledger" in page
