"""What the console reads: the letter search (scoped to sections, keyset pages, a supporter found by
the keyed hash of their email, a CSV without personal data), campaign counters by section and
target, the pacing forecast as letters per day, and a letter as rendered."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from dispatcher.ledger.models import Appeal, Delivery
from dispatcher.ledger.search import COLUMNS, LetterQuery
from dispatcher.ledger.states import State
from dispatcher.policy.pacing import PacingPolicy, RecipientLoad
from dispatcher.queue.forecast import per_day
from dispatcher.queue.preview import EmailPreview, FaxPreview, Previews, Unavailable
from tests.support.console import submit_appeal

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
CAMPAIGN = "UA-002-19-DEMO"


@pytest.fixture
def letters(service):
    """Three us appeals (an email and a fax letter each) and two ch appeals (two faxes each)."""
    service.intake.enqueuer = None
    us = [submit_appeal(service) for _ in range(3)]
    ch = [submit_appeal(service, "ch") for _ in range(2)]
    return us, ch


def ids(page) -> set[str]:
    return {r.id for r in page.rows}


def test_search_filters_and_scope(service, letters):
    us, ch = letters
    search = service.ledger.search
    everything = search.page(LetterQuery(), sections=None)
    assert everything.total == 10
    # an operator of us sees us letters only, even when it asks for ch's
    mine = search.page(LetterQuery(), sections={"us"})
    assert mine.total == 6 and {r.section for r in mine.rows} == {"us"}
    assert search.page(LetterQuery(section="ch"), sections={"us"}).total == 0
    ch_letter = ch[0].deliveries[0].id
    assert search.page(LetterQuery(delivery_id=ch_letter), sections={"us"}).total == 0
    assert ids(search.page(LetterQuery(delivery_id=ch_letter), sections={"ch"})) == {ch_letter}
    assert search.page(LetterQuery(appeal_id=ch[0].appeal_id), sections={"us"}).total == 0
    # by channel, target, state, campaign
    assert search.page(LetterQuery(channel="email"), sections=None).total == 3
    assert search.page(LetterQuery(target="embassy-ru"), sections=None).total == 2
    first = us[0].deliveries[0].id
    with service.ledger.session() as s:
        s.execute(update(Delivery).where(Delivery.id == first).values(state=State.FAILED))
    assert ids(search.page(LetterQuery(states=(State.FAILED,)), sections=None)) == {first}
    assert search.page(LetterQuery(campaign="UA-002-19"), sections=None).total == 0
    assert search.page(LetterQuery(campaign=CAMPAIGN, section="us"), sections=None).total == 6
    # a time range on when the letters were planned
    now = datetime.now(UTC)
    assert search.page(LetterQuery(since=now - timedelta(minutes=5)), sections=None).total == 10
    assert search.page(LetterQuery(until=now - timedelta(minutes=5)), sections=None).total == 0


def test_a_supporter_is_found_by_the_keyed_hash_of_their_exact_email(service):
    service.intake.enqueuer = None
    mine = submit_appeal(service, email="Jane.Roe@Example.org")
    submit_appeal(service, email="jane.roe@example.org.evil")  # near miss: not a pattern match
    submit_appeal(service, "ch", email="jane.roe@example.org")  # the same person through another section
    ref = service.intake.supporter_ref(" jane.roe@example.org ")
    found = service.ledger.search.page(LetterQuery(supporter_ref=ref), sections={"us"})
    assert {r.appeal_id for r in found.rows} == {mine.appeal_id}
    assert service.ledger.search.page(LetterQuery(supporter_ref=ref), sections=None).total == 4


def test_keyset_pages_cover_every_letter_once_newest_first(service, letters):
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = service.ledger.search.page(LetterQuery(), sections=None, cursor=cursor, limit=3)
        seen += [r.id for r in page.rows]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages == 4 and len(seen) == 10 == len(set(seen))
    created = [service.ledger.views.delivery(i).created_at for i in seen]  # type: ignore[union-attr]
    assert created == sorted(created, reverse=True)


def test_the_csv_has_the_tables_columns_and_no_personal_data(service, letters):
    us, _ch = letters
    with service.ledger.session() as s:
        s.execute(
            update(Delivery)
            .where(Delivery.id == us[0].deliveries[0].id)
            .values(last_text='=HYPERLINK("http://x")', state=State.FAILED)
        )
        names = [a.supporter_name for a in s.query(Appeal)]
        emails = [a.supporter_email for a in s.query(Appeal)]
    text = "".join(service.ledger.search.csv(LetterQuery(), sections={"us"}))
    rows = list(csv.reader(io.StringIO(text)))
    assert tuple(rows[0]) == COLUMNS
    assert len(rows) == 7 and {r[COLUMNS.index("section")] for r in rows[1:]} == {"us"}
    assert '\'=HYPERLINK("http://x")' in [r[COLUMNS.index("last_text")] for r in rows[1:]]
    for secret in names + emails:
        assert secret and secret not in text


def test_campaign_counters_by_section_and_target_are_scoped(service, letters):
    us, _ch = letters
    with service.ledger.session() as s:
        s.execute(update(Delivery).where(Delivery.id == us[0].deliveries[0].id).values(state=State.DELIVERED))
    everyone = service.ledger.campaigns.counts(CAMPAIGN, sections=None)
    assert everyone.appeals == 5 and everyone.letters.total == 10
    assert set(everyone.by_section) == {"us", "ch"}
    assert everyone.by_target[("embassy-ru", "fax")].total == 2
    scoped = service.ledger.campaigns.counts(CAMPAIGN, sections={"us"})
    assert scoped.appeals == 3 and scoped.letters.total == 6
    assert set(scoped.by_section) == {"us"} and set(scoped.appeals_by_section) == {"us"}
    assert ("embassy-ru", "fax") not in scoped.by_target
    assert scoped.letters.group("out") == 1 and scoped.letters.group("waiting") == 5
    totals = service.ledger.campaigns.totals(sections={"ch"})
    assert totals[CAMPAIGN].appeals == 2 and totals[CAMPAIGN].letters.total == 4


@dataclass(frozen=True)
class Rate:
    count: int
    seconds: float


def test_the_forecast_as_letters_per_day_until_the_deadline():
    now = datetime(2030, 3, 4, 9, 0, tzinfo=UTC)
    deadline = now + timedelta(days=6, hours=12)
    load = RecipientLoad("fax:+15550100001", [deadline] * 9, rates=[Rate(2, 86400)])
    days = per_day(load, now, PacingPolicy(margin=timedelta(hours=24)))
    assert [d for d, _n in days] == [now.date() + timedelta(days=i) for i in range(7)]
    assert sum(n for _d, n in days) == 9
    assert max(n for _d, n in days) <= 2  # the cap holds on every day
    assert per_day(RecipientLoad("fax:+15550100001", []), now, PacingPolicy()) == ()


@SQLITE
def test_a_letter_as_rendered_email_and_fax_pages(service):
    service.intake.enqueuer = None
    accepted = submit_appeal(service, name="Rosa Quill")
    previews = Previews(
        catalog=service.catalog, ledger=service.ledger, channels=service.channels, documents=service.documents
    )
    now = datetime.now(UTC)
    email, fax = (
        service.ledger.views.delivery(next(d.id for d in accepted.deliveries if d.channel == ch))
        for ch in ("email", "fax")
    )
    assert email is not None and fax is not None
    shown = previews.of(email, now)
    assert isinstance(shown, EmailPreview)
    assert "Rosa Quill" in shown.text and "Rosa Quill" in shown.html and shown.subject
    paged = previews.of(fax, now)
    assert isinstance(paged, FaxPreview) and paged.pages >= 2  # a cover and the letter
    png = previews.fax_page(fax, 1, now)
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert previews.fax_page(fax, paged.pages + 1, now) is None
    # the supporter's data erased: nothing to show, and the page says why
    with service.ledger.session() as s:
        s.execute(
            update(Appeal).where(Appeal.id == accepted.appeal_id).values(supporter_name=None, supporter_email=None)
        )
    gone = previews.of(email, now)
    assert isinstance(gone, Unavailable) and "erased or purged" in gone.why
