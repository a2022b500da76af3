"""Digests: when a recipient's line cannot carry every letter before the deadline and the
section allows it, one letter with the model text and the list of supporters goes instead of
the letters that would not make it, and each supporter's delivery records that it went in it."""

from __future__ import annotations

import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dispatcher.app import Service
from dispatcher.channels.email.channel import BOUNCE_WINDOW
from dispatcher.config.loader import load_catalog
from dispatcher.ledger.lifecycle import Result
from dispatcher.ledger.models import Delivery, State
from dispatcher.ledger.states import Event
from dispatcher.queue.forecast import campaign_forecast
from dispatcher.render.fax import FaxRenderer
from dispatcher.render.faxraster import pdf_page_texts
from dispatcher.render.letters import LetterRequest, Renderer, Supporter
from tests.conftest import ROOT, Running, appeal_body, make_settings, wait_for

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

CAMPAIGN = "UA-002-19-DEMO"
AMBASSADOR = "ambassador-us"
#: the us section's window is 122 days: issued this long ago, its deadline is the end of tomorrow
ISSUED_DAYS_AGO = 121


def us_config(tmp_path: Path, *, digest: bool) -> Path:
    """The real config, the us section writing to the ambassador only (by email), with or
    without digests on that route."""
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    us = config / "sections" / "us.toml"
    text = us.read_text()
    president = '[[campaigns.UA-002-19.writes]]\ntarget = "president"\nchannels = ["fax"]\n\n'
    assert president in text
    text = text.replace(president, "")
    if digest:
        text = text.replace(
            'target = "ambassador-us"\nchannels = ["email"]',
            'target = "ambassador-us"\nchannels = ["email"]\ndigest = true',
        )
    us.write_text(text)
    return config


def short_line_service(tmp_path, database_url, redis_url, environ, smtp_port: int, *, digest: bool) -> Service:
    config = us_config(tmp_path, digest=digest)
    # Two a day with a deadline at the end of tomorrow: at most five letters fit.
    settings = make_settings(
        tmp_path, database_url=database_url, redis_url=redis_url, smtp_port=smtp_port, email_limits=("2/day",)
    ).but(config_dir=config)
    issued = datetime.now(UTC).date() - timedelta(days=ISSUED_DAYS_AGO)
    catalog = load_catalog(config, ROOT / "templates").with_demo_copies(issued)
    service = Service(settings, environ=environ, catalog_override=catalog)
    service.ledger.migrate()
    return service


def submit(service: Service, names: list[tuple[str, str]]) -> list[str]:
    """Appeals accepted while the queue was down: every letter waits in the ledger."""
    enqueuer, service.intake.enqueuer = service.intake.enqueuer, None
    try:
        ids = []
        for name, city in names:
            body = appeal_body()
            body["supporter"].update(name=name, city=city)
            ids.append(service.intake.submit(body).appeal_id)
        return ids
    finally:
        service.intake.enqueuer = enqueuer


NAMES = [
    ("Jane Doe", "Boston"),
    ("Ana Lima", "Newark"),
    ("Li Wei", "Seattle"),
    ("Omar Haddad", "Detroit"),
    ("Eve <b>Bold</b>", "Austin"),
    ("Zoë Ångström", "Duluth"),
    ("Иван Петров", "Brooklyn"),
    ("Sam Lee", "Denver"),
]


@SQLITE
def test_a_short_line_gets_one_digest_instead_of_letters_that_would_miss_the_deadline(
    tmp_path, database_url, redis_server, environ, smtp
):
    service = short_line_service(tmp_path, database_url, redis_server.url, environ, smtp.port, digest=True)
    appeals = submit(service, NAMES)

    # The forecast says the line is short and what a digest would do.
    (row,) = campaign_forecast(ledger=service.ledger, pacer=service.pacer, campaign=CAMPAIGN, now=datetime.now(UTC))
    assert row.forecast.waiting == 8 and not row.forecast.fits
    assert row.digest is not None
    assert (row.digest.letters, row.digest.digests, row.digest.after.fits) == (8, 1, True)

    with Running(service):
        wait_for(lambda: len(smtp.messages) >= 1)
        wait_for(
            lambda: all(service.ledger.views.appeal(a).as_json()["deliveries"][0]["state"] == "sent" for a in appeals)
        )

    (received,) = smtp.messages  # one letter, not eight
    msg = received.message
    section = service.catalog.sections["us"]
    # From the section itself, replies to the section: no supporter speaks for the others.
    assert msg["From"].addresses[0].display_name == section.sender.name
    assert msg["Reply-To"].addresses[0].addr_spec == str(section.sender.address)
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert "I am deeply concerned" in text  # the model letter
    assert "Signatures (8):" in text
    for k, (name, city) in enumerate(NAMES, start=1):
        assert f"{k}. {name}, {city}, US" in text
    assert "Eve &lt;b&gt;Bold&lt;/b&gt;" in html and "<b>Bold</b>" not in html
    assert "Please act now." not in text  # personal messages stay out of a digest

    # Each supporter's letter records that it went in that digest, and when.
    views = [service.ledger.views.appeal(a).as_json()["deliveries"][0] for a in appeals]
    digest_ids = {v["digest"] for v in views}
    assert len(digest_ids) == 1
    (digest_id,) = digest_ids
    assert msg["Message-ID"] == f"<{digest_id}@{section.sender.domain}>"
    assert all(v["state"] == "sent" and v["sent_at"] and digest_id in v["last_text"] for v in views)
    # The campaign counts eight letters delivered (the supporters'), not nine.
    assert service.ledger.views.counters(CAMPAIGN).as_json()["letters_delivered"] == 8
    # One try, the digest's; the supporters' letters were never tried one by one.
    assert [t.outcome for t in service.ledger.views.attempts(digest_id)] == ["sent"]
    assert all(v["attempts"] == 0 for v in views)


@SQLITE
def test_digests_are_off_unless_the_section_allows_them(tmp_path, database_url, redis_server, environ):
    service = short_line_service(tmp_path, database_url, redis_server.url, environ, 1, digest=False)
    submit(service, NAMES)
    (row,) = campaign_forecast(ledger=service.ledger, pacer=service.pacer, campaign=CAMPAIGN, now=datetime.now(UTC))
    assert not row.forecast.fits and row.digest is None
    released: list[str] = []
    reconciler = service.reconciler(fresh_grace=timedelta(0))
    reconciler.enqueuer = type("Q", (), {"send": lambda self, ids: released.extend(ids) or list(ids)})()
    reconciler.tick()
    with service.ledger.session() as s:
        states = Counter(s.scalars(select(Delivery.state)).all())
    assert len(released) == 1  # the first letter, at the cap's pace; the rest wait their turn
    assert states == {State.QUEUED: 1, State.PLANNED: 7}


@SQLITE
def test_late_letters_join_the_waiting_digest_only_while_the_line_is_short_and_closing_cancels_all(
    tmp_path, database_url, redis_server, environ
):
    service = short_line_service(tmp_path, database_url, redis_server.url, environ, 1, digest=True)
    reconciler = service.reconciler(fresh_grace=timedelta(seconds=30))
    reconciler.enqueuer = type("Q", (), {"send": lambda self, ids: list(ids)})()
    clock: dict[str, datetime] = {}
    reconciler.clock = lambda: clock["now"]

    def tick(after: float) -> Counter[tuple[str, str]]:
        clock["now"] = start + timedelta(seconds=after)
        reconciler.tick()
        with service.ledger.session() as s:
            return Counter((r.kind, r.state) for r in s.execute(select(Delivery.kind, Delivery.state)))

    start = datetime.now(UTC)
    submit(service, NAMES[:6])
    assert tick(60) == {("letter", State.BUNDLED): 6, ("digest", State.PLANNED): 1}
    # Eight more before the digest has gone: the line is short again, and they join it.
    submit(service, NAMES)
    assert tick(80) == {("letter", State.BUNDLED): 14, ("digest", State.PLANNED): 1}
    with service.ledger.session() as s:
        (digest_id,) = s.scalars(select(Delivery.id).where(Delivery.kind == "digest")).all()
    assert [s.name for s in service.ledger.schedule.digest_signers(digest_id)] == [n for n, _ in NAMES[:6] + NAMES]
    # The digest goes; two late letters fit the line and go one by one, in no digest.
    assert tick(150) == {("letter", State.BUNDLED): 14, ("digest", State.QUEUED): 1}
    submit(service, NAMES[:2])
    states = tick(220)
    assert states[("letter", State.BUNDLED)] == 14 and sum(states.values()) == 17

    assert service.ledger.controls.close_campaign(CAMPAIGN, "released", datetime.now(UTC)) == 17
    with service.ledger.session() as s:
        assert set(s.scalars(select(Delivery.state)).all()) == {State.CANCELLED}


def test_a_digest_fax_lists_the_supporters_in_its_text_layer(catalog):
    campaign = catalog.campaigns["UA-002-19"]
    section = catalog.sections["ch"]
    target = catalog.target("UA-002-19", "ch", "president")
    signers = tuple(
        Supporter(name, "", city, "CH") for name, city in [("Иван Петров", "Genève"), ("Zoë Ångström", "Bern")]
    )
    request = LetterRequest(
        campaign=campaign,
        section=section,
        target=target,
        language="de",
        supporter=Supporter(section.sender.name, str(section.sender.address)),
        message=None,
        date=datetime(2026, 3, 2).date(),
        signers=signers,
    )
    document = FaxRenderer(Renderer(ROOT / "templates")).render(request, sent_at=datetime(2026, 3, 2, 9, tzinfo=UTC))
    text = " ".join(" ".join(t.split()) for t in pdf_page_texts(document.pdf))
    assert "Unterschriften (2):" in text
    assert "Иван Петров, Genève, CH" in text and "Zoë Ångström, Bern, CH" in text


@SQLITE
def test_a_digests_letters_wait_through_its_retries_and_end_as_it_ends(tmp_path, database_url, redis_server, environ):
    from dispatcher.ledger.lifecycle import DigestRoute

    service = short_line_service(tmp_path, database_url, redis_server.url, environ, 1, digest=True)
    submit(service, NAMES[:3])
    with service.ledger.session() as s:
        rows = s.execute(select(Delivery.id, Delivery.recipient, Delivery.created_at)).all()
    route = DigestRoute(CAMPAIGN, "us", AMBASSADOR, "email", rows[0].recipient, "en", "us.dispatch.example")
    now = datetime.now(UTC)
    digest_id, joined = service.ledger.lifecycle.bundle(
        [r.id for r in rows], route, now, oldest=rows[0].created_at
    ) or ("", 0)
    assert joined == 3

    def letters() -> set[tuple[str, str | None]]:
        with service.ledger.session() as s:
            got = s.execute(select(Delivery.state, Delivery.sent_at).where(Delivery.digest_id == digest_id)).all()
        return {(r.state, "sent_at" if r.sent_at else None) for r in got}

    claim = service.ledger.lifecycle.claim(digest_id, "w", now)
    assert claim is not None and claim.kind == "digest" and claim.appeal_id is None
    service.ledger.lifecycle.finish(
        claim, Result(Event.RETRY, "transient", next_attempt_at=now), worker="w", started_at=now, now=now
    )
    assert letters() == {(State.BUNDLED, None)}  # greylisted: they wait with it
    # Meanwhile another supporter's letter goes on its own: their data is purged on schedule,
    # while the digest's supporters' data stays until it is final.
    (other,) = submit(service, NAMES[3:4])
    (alone,) = [d["id"] for d in service.ledger.views.appeal(other).as_json()["deliveries"]]
    later = datetime.now(UTC)
    alone_claim = service.ledger.lifecycle.claim(alone, "w", later)
    assert alone_claim is not None
    service.ledger.lifecycle.finish(alone_claim, Result(Event.SENT, "sent"), worker="w", started_at=later, now=later)
    # an email is settled once a bounce can no longer come
    assert service.ledger.housekeeping.purge_personal_data(later + timedelta(seconds=1), timedelta(0)) == 0
    settled = later + BOUNCE_WINDOW + timedelta(seconds=1)
    assert service.ledger.housekeeping.purge_personal_data(settled, timedelta(0)) == 1
    assert service.ledger.views.supporter(other) is None
    claim = service.ledger.lifecycle.claim(digest_id, "w", now)
    assert claim is not None
    service.ledger.lifecycle.finish(claim, Result(Event.SENT, "sent"), worker="w", started_at=now, now=now)
    assert letters() == {(State.SENT, "sent_at")}
    # Their supporters' data is purged on the usual schedule (a digest has no appeal of its own).
    assert service.ledger.housekeeping.purge_personal_data(settled, timedelta(0)) == 3
    # A letter already bundled cannot be bundled again.
    assert service.ledger.lifecycle.bundle([rows[0].id], route, now, oldest=now) is None


@SQLITE
def test_a_digest_fax_goes_through_a_real_call_and_its_letters_are_delivered_with_it(
    tmp_path, database_url, redis_server, environ
):
    from dispatcher.sandbox.faxlab import FaxLab

    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    ch = config / "sections" / "ch.toml"
    route = 'target = "president"\nchannels = ["fax"]'
    ch.write_text(ch.read_text().replace(route, route + "\ndigest = true"))
    settings = make_settings(
        tmp_path, database_url=database_url, redis_url=redis_server.url, smtp_port=1, fax_limits=("2/day",)
    ).but(config_dir=config)
    # ch's window is 42 days: issued 41 days ago, its deadline is the end of tomorrow in Zurich.
    catalog = load_catalog(config, ROOT / "templates").with_demo_copies(datetime.now(UTC).date() - timedelta(days=41))
    service = Service(settings, environ=environ, catalog_override=catalog)
    service.ledger.migrate()
    enqueuer, service.intake.enqueuer = service.intake.enqueuer, None
    for name, city in NAMES:
        body = appeal_body(section="ch", language="de")
        body["supporter"].update(name=name, city=city, country="CH")
        service.intake.submit(body)
    service.intake.enqueuer = enqueuer

    def president_letters() -> list[Delivery]:
        with service.ledger.session() as s:
            return list(s.scalars(select(Delivery).where(Delivery.target == "president")).all())

    with Running(service):
        wait_for(lambda: {d.state for d in president_letters()} == {State.DELIVERED}, timeout=60)
    letters = [d for d in president_letters() if d.kind == "letter"]
    (digest,) = [d for d in president_letters() if d.kind == "digest"]
    assert len(letters) == 8 and {d.digest_id for d in letters} == {digest.id}
    assert all(d.delivered_at == digest.delivered_at for d in letters)
    # One call to the President's line carried it: a cover page and the letter with its list.
    assert digest.gateway == "lab" and digest.remote_id and (digest.pages or 0) >= 2
    lab = FaxLab(settings.var_dir / "sandbox" / "fax")
    assert (lab.path_of(digest.remote_id) / "received.tiff").is_file()
    # The embassy's route has no digests: its letters go one by one, at 2 a day.
    with service.ledger.session() as s:
        embassy = Counter(s.scalars(select(Delivery.state).where(Delivery.target == "embassy-ru")).all())
    assert embassy[State.BUNDLED] == 0 and embassy[State.PLANNED] >= 6
