"""Erasing a supporter from the console, through the real API app (TestClient) on a real ledger
and Redis: an admin's two steps (the preview in counts, then the confirmation) erase the appeal
in the ledger, audited under the admin's name; a viewer, an operator and a form without its
token are refused and nothing changes; an email that matches nothing says so and audits nothing;
and the email is never in a URL, a Location header or the page's visible text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from dispatcher.app import Service
from dispatcher.ledger.housekeeping import PERSONAL_COLUMNS
from dispatcher.ledger.models import Appeal
from tests.support.console import csrf_of, signed_in, submit_appeal

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
PAGE = "/console/supporters/erase"
EMAIL = "Rosa.Quill@example.org"


@pytest.fixture
def web(service: Service) -> Iterator[TestClient]:
    service.intake.enqueuer = None  # letters wait in the ledger: no worker runs here
    with TestClient(service.api(), raise_server_exceptions=False) as client:
        yield client


def personal_data(service: Service, appeal_id: str) -> dict[str, Any]:
    with service.ledger.session() as s:
        row = s.execute(select(Appeal).where(Appeal.id == appeal_id)).scalar_one()
        return {c: getattr(row, c) for c in (*PERSONAL_COLUMNS, "erased_at")}


def erasures(service: Service) -> list[Any]:
    return [e for e in service.ledger.audit.entries() if e.action == "supporter.erase"]


def assert_no_email_in_urls(*answers: Any) -> None:
    for answer in answers:
        for response in (*answer.history, answer):
            for url in (str(response.url), response.headers.get("location", "")):
                assert "@" not in url and "rosa" not in url.lower(), url


def test_an_admin_erases_a_supporter_by_email_in_two_steps(web, service):
    mine = submit_appeal(service, name="Rosa Quill", email=EMAIL)
    other = submit_appeal(service, name="Otto Other", email="otto@example.org")
    admin = signed_in(web, service, "admin")
    form = web.get(PAGE)
    assert form.status_code == 200 and f'href="{PAGE}"' in form.text  # in the nav, for an admin
    assert 'method="post" action="/console/supporters/erase"' in form.text

    # step 2: the preview, in counts; the email only in the hidden field carrying it on
    asked = {"csrf": csrf_of(form.text), "email": EMAIL.lower(), "reason": "request #41 by email"}
    preview = web.post(PAGE, data=asked)
    assert preview.status_code == 200 and "What the erasure will do" in preview.text
    assert 'letters to cancel</div><div class="value">2' in preview.text
    assert "Rosa" not in preview.text
    assert preview.text.count(EMAIL.lower()) == 1 and f'name="email" value="{EMAIL.lower()}"' in preview.text
    assert personal_data(service, mine.appeal_id)["erased_at"] is None and erasures(service) == []

    # a wrong confirmation erases nothing
    wrong = web.post(PAGE, data={**asked, "confirm": "erase please"})
    assert wrong.status_code == 200 and "nothing was erased" in wrong.text
    assert personal_data(service, mine.appeal_id)["erased_at"] is None and erasures(service) == []

    # step 3: erased, the report as the flash on the empty form
    done = web.post(PAGE, data={**asked, "confirm": "ERASE"}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == PAGE
    report = web.get(PAGE)
    assert "Erased 1 appeal(s): 2 letter(s) cancelled" in report.text and "Rosa" not in report.text
    assert_no_email_in_urls(form, preview, wrong, done, report)

    data = personal_data(service, mine.appeal_id)
    assert data.pop("erased_at") is not None and set(data.values()) == {None}
    assert personal_data(service, other.appeal_id)["supporter_name"] == "Otto Other"
    assert {service.ledger.views.state_of(d.id) for d in mine.deliveries} == {"cancelled"}
    [entry] = erasures(service)
    assert entry.actor == admin.name and entry.reason == "request #41 by email"
    assert EMAIL.lower() not in str(entry) and "Rosa" not in str(entry)
    letter = web.get(f"/console/letters/{mine.deliveries[0].id}")
    assert letter.status_code == 200 and "erased or purged" in letter.text


def test_an_appeal_is_erased_by_its_id_typed_as_the_confirmation(web, service):
    mine = submit_appeal(service)
    signed_in(web, service, "admin")
    token = csrf_of(web.get(PAGE).text)
    asked = {"csrf": token, "appeal_id": mine.appeal_id, "campaign": "UA-002-19-DEMO", "reason": "safety"}
    assert "Type ERASE (or the appeal id)" in web.post(PAGE, data=asked).text
    done = web.post(PAGE, data={**asked, "confirm": mine.appeal_id}, follow_redirects=False)
    assert done.status_code == 303
    assert personal_data(service, mine.appeal_id)["erased_at"] is not None
    # again: nothing more to do, said so
    again = web.post(PAGE, data={**asked, "confirm": "ERASE"})  # the redirect followed
    assert "Already erased: 1 appeal(s)" in again.text


@pytest.mark.parametrize("role, sections", [("viewer", ()), ("operator", ("us",)), ("operator", ("us", "ch"))])
def test_only_an_admin_reaches_the_page(web, service, role, sections):
    """Erasure concerns every section: an operator of us (or of us and ch) and a viewer get 403
    for the page and the form, whatever they post, and nothing changes."""
    mine = submit_appeal(service, email=EMAIL)
    signed_in(web, service, role, sections)
    overview = web.get("/console/")
    assert PAGE not in overview.text  # no link to it
    assert web.get(PAGE).status_code == 403
    token = csrf_of(overview.text)
    for form in ({"email": EMAIL}, {"appeal_id": mine.appeal_id}):
        answer = web.post(PAGE, data={"csrf": token, "reason": "x", "confirm": "ERASE", **form})
        assert answer.status_code == 403 and "Only an admin may do this" in answer.text
        assert "What the erasure will do" not in answer.text
    assert personal_data(service, mine.appeal_id)["erased_at"] is None and erasures(service) == []


def test_a_form_without_its_token_is_refused(web, service):
    mine = submit_appeal(service, email=EMAIL)
    signed_in(web, service, "admin")
    for token in ({}, {"csrf": "forged"}):
        answer = web.post(PAGE, data={**token, "email": EMAIL, "reason": "x", "confirm": "ERASE"})
        assert answer.status_code == 403
    assert personal_data(service, mine.appeal_id)["erased_at"] is None and erasures(service) == []


def test_nothing_found_says_so_and_audits_nothing(web, service):
    mine = submit_appeal(service, email=EMAIL)
    signed_in(web, service, "admin")
    token = csrf_of(web.get(PAGE).text)
    for form in (
        {"email": "nobody@example.org"},
        {"email": EMAIL, "section": "ch"},  # narrowed to a section she did not write in
        {"appeal_id": "ap_does_not_exist"},
    ):
        for confirm in ({}, {"confirm": "ERASE"}):
            answer = web.post(PAGE, data={"csrf": token, "reason": "x", **form, **confirm})
            assert answer.status_code == 404 and "Nothing to erase" in answer.text and "Nothing was done" in answer.text
            assert "nobody@" not in answer.text and EMAIL not in answer.text  # not echoed back
            assert_no_email_in_urls(answer)
    # a form that names no one, or both, or gives no reason: said so, nothing done
    for form in ({}, {"email": EMAIL, "appeal_id": mine.appeal_id}, {"email": EMAIL, "reason": " "}):
        answer = web.post(PAGE, data={"csrf": token, "reason": "x", **form, "confirm": "ERASE"})
        assert answer.status_code == 400
    assert personal_data(service, mine.appeal_id)["erased_at"] is None and erasures(service) == []
