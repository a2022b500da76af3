"""The campaigns, letters and letter pages of the console, through the real API app (TestClient) on
a real ledger and Redis: what they show, the actions and their refusals, closing a campaign, and
the section scope — every URL of section ch's letters and campaign data asked for by an operator
of us answers 404 or shows nothing of ch (and the supporter erasure, an admin's, answers 403)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from dispatcher.app import Service
from dispatcher.ledger.models import Appeal, Delivery
from dispatcher.ledger.states import State
from tests.support.console import csrf_of, signed_in, submit_appeal

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
pytestmark = SQLITE
CAMPAIGN = "UA-002-19-DEMO"


def ch_only(service: Service) -> tuple[str, ...]:
    """What of section ch an operator of us must never see: its own target, its fax number (from
    the catalog: tests do not spell a real office's number), its name."""
    embassy = service.catalog.target(CAMPAIGN, "ch", "embassy-ru")
    assert embassy.fax
    return ("embassy-ru", embassy.fax, "Switzerland")


@pytest.fixture
def web(service: Service) -> Iterator[TestClient]:
    service.intake.enqueuer = None  # letters wait in the ledger: no worker runs here
    with TestClient(service.api(), raise_server_exceptions=False) as client:
        yield client


def post_form(web: TestClient, page_path: str, path: str, **form: str) -> Any:
    """Post a form as the page at ``page_path`` would (its CSRF token)."""
    token = csrf_of(web.get(page_path).text)
    return web.post(path, data={"csrf": token, **form}, follow_redirects=False)


def state_of(service: Service, delivery: str) -> str | None:
    return service.ledger.views.state_of(delivery)


def test_the_pages_show_campaigns_letters_and_a_letter_as_rendered(web, service):
    us = submit_appeal(service, name="Rosa Quill")
    submit_appeal(service, "ch")
    email = next(d.id for d in us.deliveries if d.channel == "email")
    fax = next(d.id for d in us.deliveries if d.channel == "fax")
    signed_in(web, service, "admin")

    listing = web.get("/console/campaigns")
    assert listing.status_code == 200 and CAMPAIGN in listing.text
    page = web.get(f"/console/campaigns/{CAMPAIGN}")
    assert page.status_code == 200
    assert "By section" in page.text and "embassy-ru" in page.text  # an admin sees every section
    assert "<svg" in page.text and "deadline" in page.text  # the forecast's chart, drawn here
    assert "Rosa Quill" not in page.text

    letters = web.get("/console/letters", params={"section": "us", "channel": "email"})
    assert letters.status_code == 200 and email in letters.text and fax not in letters.text
    assert "Rosa Quill" not in letters.text
    exported = web.get("/console/letters.csv", params={"section": "us"})
    assert exported.headers["content-type"].startswith("text/csv")
    assert {row["id"] for row in csv.DictReader(io.StringIO(exported.text))} == {email, fax}
    broken = web.get("/console/letters", params={"cursor": "not-a-cursor", "since": "yesterday"})
    assert broken.status_code == 200 and "since: give a day as YYYY-MM-DD" in broken.text
    broken = web.get("/console/letters", params={"cursor": "not-a-cursor"})
    assert broken.status_code == 200 and "that page link is broken" in broken.text

    shown = web.get(f"/console/letters/{email}")
    assert shown.status_code == 200
    assert "Rosa Quill" in shown.text  # the letter as rendered, to an operator of its section
    # a planned letter may be sent now or cancelled; only a letter being sent is handed back
    assert "Retry now" in shown.text and "Cancel" in shown.text and "Hand back" not in shown.text
    html = web.get(f"/console/letters/{email}/letter.html")
    assert html.status_code == 200 and "Rosa Quill" in html.text
    assert "sandbox" in html.headers["content-security-policy"]
    faxed = web.get(f"/console/letters/{fax}")
    assert f"/console/letters/{fax}/fax/1.png" in faxed.text
    png = web.get(f"/console/letters/{fax}/fax/1.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert web.get(f"/console/letters/{fax}/fax/99.png").status_code == 404
    assert web.get(f"/console/letters/{fax}/letter.html").status_code == 404  # a fax has no HTML


def test_an_erased_supporters_letter_says_so(web, service):
    us = submit_appeal(service)
    email = next(d.id for d in us.deliveries if d.channel == "email")
    with service.ledger.session() as s:
        s.execute(update(Appeal).where(Appeal.id == us.appeal_id).values(supporter_name=None, supporter_email=None))
    signed_in(web, service, "operator", ("us",))
    page = web.get(f"/console/letters/{email}")
    assert page.status_code == 200 and "erased or purged" in page.text
    assert web.get(f"/console/letters/{email}/letter.html").status_code == 404


def test_a_supporter_is_found_by_email_without_the_email_in_any_url(web, service):
    mine = submit_appeal(service, email="Rosa.Quill@example.org")
    submit_appeal(service)
    signed_in(web, service, "viewer", ("us",))  # a viewer may search
    answer = post_form(web, "/console/letters", "/console/letters/supporter", email="rosa.quill@example.org")
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert "@" not in location and "rosa" not in location.lower()
    page = web.get(location)
    assert mine.appeal_id in page.text and page.text.count("/console/letters/dl_") == 2


def test_cancel_and_retry_from_the_letter_page_are_audited_and_refused_with_reasons(web, service):
    us = submit_appeal(service)
    email = next(d.id for d in us.deliveries if d.channel == "email")
    fax = next(d.id for d in us.deliveries if d.channel == "fax")
    signed_in(web, service, "operator", ("us",))
    page = f"/console/letters/{email}"

    # no reason: nothing done
    answer = post_form(web, page, f"{page}/cancel", expected="planned", reason=" ")
    assert answer.status_code == 303 and state_of(service, email) == "planned"
    # without the form's token: refused, nothing done
    assert web.post(f"{page}/cancel", data={"reason": "x", "expected": "planned"}).status_code == 403
    assert state_of(service, email) == "planned"

    answer = post_form(web, page, f"{page}/cancel", expected="planned", reason="sent by post instead")
    assert answer.status_code == 303
    assert state_of(service, email) == "cancelled"
    shown = web.get(page).text
    assert "Cancel: planned → cancelled" in shown  # the flash message
    assert "sent by post instead" in shown and "letter.cancel" in shown  # the audit entry in the timeline
    [entry] = service.ledger.audit.entries(target_id=email)
    assert entry.action == "letter.cancel" and entry.section == "us" and entry.reason == "sent by post instead"

    # a letter that moved after the page was shown: refused, saying what it is now
    with service.ledger.session() as s:
        s.execute(update(Delivery).where(Delivery.id == fax).values(state=State.FAILED))
    answer = post_form(web, f"/console/letters/{fax}", f"/console/letters/{fax}/cancel", expected="planned", reason="x")
    assert answer.status_code == 303 and state_of(service, fax) == "failed"
    assert "it was planned, it is failed now" in web.get(f"/console/letters/{fax}").text
    # retry of a failed letter whose campaign is closed: refused with the reason
    service.ledger.controls.close_campaign(CAMPAIGN, "the detainee was released", service.clock())
    post_form(web, f"/console/letters/{fax}", f"/console/letters/{fax}/retry", expected="failed", reason="again")
    assert state_of(service, fax) == "failed"
    assert "is closed: the detainee was released" in web.get(f"/console/letters/{fax}").text


def test_a_viewer_sees_but_cannot_act(web, service):
    us = submit_appeal(service)
    email = next(d.id for d in us.deliveries if d.channel == "email")
    signed_in(web, service, "viewer", ("us",))
    page = web.get(f"/console/letters/{email}")
    assert page.status_code == 200 and "Act on it" not in page.text
    token = csrf_of(web.get("/console/letters").text)  # the search form's (every page has the token)
    answer = web.post(f"/console/letters/{email}/cancel", data={"csrf": token, "reason": "x", "expected": "planned"})
    assert answer.status_code == 403 and state_of(service, email) == "planned"


def test_closing_a_campaign_is_an_admins_and_takes_a_reason_and_a_confirmation(web, service):
    us = submit_appeal(service)
    page = f"/console/campaigns/{CAMPAIGN}"
    signed_in(web, service, "operator", ("us",))
    assert "Close the campaign" not in web.get(page).text
    token = csrf_of(web.get(page).text)
    assert web.post(f"{page}/close", data={"csrf": token, "reason": "x", "confirm": CAMPAIGN}).status_code == 403

    signed_in(web, service, "admin")
    first = post_form(web, page, f"{page}/close", reason="the detainee was released")
    assert first.status_code == 200 and "Type the campaign's id to confirm" in first.text
    assert service.ledger.controls.closure(CAMPAIGN) is None  # nothing yet
    wrong = web.post(
        f"{page}/close", data={"csrf": csrf_of(first.text), "reason": "the detainee was released", "confirm": "UA"}
    )
    assert wrong.status_code == 200 and service.ledger.controls.closure(CAMPAIGN) is None
    done = web.post(
        f"{page}/close",
        data={"csrf": csrf_of(first.text), "reason": "the detainee was released", "confirm": CAMPAIGN},
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert service.ledger.controls.closure(CAMPAIGN) is not None
    assert {state_of(service, d.id) for d in us.deliveries} == {"cancelled"}
    [entry] = [e for e in service.ledger.audit.entries() if e.action == "campaign.close"]
    assert entry.target_id == CAMPAIGN and entry.reason == "the detainee was released"
    assert entry.detail == "2 waiting letter(s) cancelled"
    assert "closed: 2 waiting letter(s) cancelled" in web.get(page).text


def test_nothing_of_section_ch_reaches_an_operator_of_us(web, service):
    """Every console URL of ch's letters and campaign data, as an operator of us: 404 for each of
    ch's letters (page, HTML, PNG pages, every action), and no ch id or name in any list, page or
    CSV, whatever the filters ask for."""
    mine = submit_appeal(service)
    theirs = [submit_appeal(service, "ch", name="Heidi Chlaus", email=f"heidi{n}@example.ch") for n in ("", ".b")]
    ch_letters = [d.id for a in theirs for d in a.deliveries]
    ch_ids = [*ch_letters, *(a.appeal_id for a in theirs)]
    with service.ledger.session() as s:  # one of them failed: retry would be offered to its own operators
        s.execute(update(Delivery).where(Delivery.id == ch_letters[0]).values(state=State.FAILED))
    signed_in(web, service, "operator", ("us",))
    token = csrf_of(web.get("/console/letters").text)

    # every URL of a ch letter answers as a letter that does not exist
    nowhere = web.get("/console/letters/dl_does_not_exist")
    assert nowhere.status_code == 404
    for letter in ch_letters:
        for path in (f"/console/letters/{letter}", f"/console/letters/{letter}/letter.html"):
            answer = web.get(path)
            assert answer.status_code == 404 and answer.text == nowhere.text, path
        for n in (1, 2, 3):
            assert web.get(f"/console/letters/{letter}/fax/{n}.png").status_code == 404
        for verb in ("retry", "cancel", "hand-back", "nonsense"):
            for expected in ("planned", "failed"):
                answer = web.post(
                    f"/console/letters/{letter}/{verb}", data={"csrf": token, "reason": "x", "expected": expected}
                )
                assert answer.status_code == 404, (letter, verb)
    assert [state_of(service, d) for d in ch_letters] == ["failed"] + ["planned"] * (len(ch_letters) - 1)
    assert [e for e in service.ledger.audit.entries() if e.target_kind == "letter"] == []

    # lists, pages and CSVs, with every filter pointing at ch
    pages = [
        "/console/campaigns",
        f"/console/campaigns/{CAMPAIGN}",
        "/console/letters",
        "/console/letters.csv",
        *(
            f"/console/letters{suffix}?{query}"
            for suffix in ("", ".csv")
            for query in (
                "section=ch",
                f"campaign={CAMPAIGN}&section=ch",
                "target=embassy-ru",
                "channel=fax",
                "state=failed",
                f"delivery={ch_letters[0]}",
                f"appeal={theirs[0].appeal_id}",
                f"supporter={service.intake.supporter_ref('heidi@example.ch')}&section=ch",
                f"supporter={service.intake.supporter_ref('heidi@example.ch')}",
            )
        ),
    ]
    for path in pages:
        answer = web.get(path)
        assert answer.status_code == 200, path
        for secret in (*ch_ids, *ch_only(service), "Heidi", "heidi@example.ch"):
            if secret in path:
                continue  # the search form shows what was asked for; the results are checked below
            assert secret not in answer.text, (path, secret)
        if "section=ch" in path or "target=" in path or "delivery=" in path or "appeal=" in path:
            if ".csv" in path:
                assert answer.text.count("\n") == 1, path  # the header, no row
            else:
                assert "0 letters" in answer.text and "no letter matches" in answer.text, path
    # the search by email finds nothing of ch either
    found = post_form(web, "/console/letters", "/console/letters/supporter", email="heidi@example.ch")
    assert not any(i in web.get(found.headers["location"]).text for i in ch_ids)
    # and what is ours is there
    assert mine.appeal_id in web.get("/console/letters").text
    # a campaign none of us's sections take part in answers 404, like one that does not exist
    assert web.get("/console/campaigns/UA-999-99").status_code == 404
    # closing is an admin's: an operator gets 403 and nothing is closed
    answer = web.post(f"/console/campaigns/{CAMPAIGN}/close", data={"csrf": token, "reason": "x", "confirm": CAMPAIGN})
    assert answer.status_code == 403 and service.ledger.controls.closure(CAMPAIGN) is None
    # erasing a supporter is an admin's too: the page and its form answer 403 whatever they name
    # (the same refusal for ch's supporters as for none), and nothing is erased
    assert web.get("/console/supporters/erase").status_code == 403
    for named in ({"email": "heidi@example.ch"}, {"appeal_id": theirs[0].appeal_id}, {"appeal_id": "ap_nothing"}):
        answer = web.post("/console/supporters/erase", data={"csrf": token, "reason": "x", "confirm": "ERASE", **named})
        assert answer.status_code == 403 and "Heidi" not in answer.text and theirs[0].appeal_id not in answer.text
    assert not any(service.ledger.erasures.is_erased(a.appeal_id) for a in theirs)
