"""Ledger behaviour on SQLite and PostgreSQL: claims, the outbox, stale claims, deadlines and
the retention of supporters' personal data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from dispatcher.ledger.lifecycle import Result
from dispatcher.ledger.migrate import current
from dispatcher.ledger.models import Appeal, Base, Delivery, State
from dispatcher.ledger.states import Event
from tests.conftest import appeal_body


def accept(service, **overrides):
    return service.intake.submit(appeal_body(**overrides))


def row(service, delivery_id: str) -> Delivery:
    with service.ledger.session() as s:
        return s.get(Delivery, delivery_id)


def test_migrations_reach_head(service):
    assert current(service.ledger.engine) == "0013"


def test_migrations_build_the_tables_the_models_declare(service):
    """A migration written by hand that forgets a column, an index or a key shows here, on the
    backend the test runs on, instead of as a slow query or an error in production."""
    with service.ledger.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_claim_is_exclusive_and_only_for_due_letters(service):
    queued = accept(service).deliveries[0]
    # released already: a worker whose clock runs behind still takes it
    assert service.ledger.lifecycle.claim(queued.id, "w0", datetime.now(UTC) - timedelta(seconds=5)) is not None
    service.intake.enqueuer = None
    delivery = accept(service).deliveries[0]  # planned: due now
    now = datetime.now(UTC)
    assert service.ledger.lifecycle.claim(delivery.id, "w1", now - timedelta(seconds=5)) is None  # not due yet
    first = service.ledger.lifecycle.claim(delivery.id, "w1", now)
    assert first is not None and first.attempt == 1
    assert service.ledger.lifecycle.claim(delivery.id, "w2", now) is None
    assert row(service, delivery.id).claimed_by == "w1"


def test_a_claim_carries_its_own_appeals_supporter(service):
    service.intake.enqueuer = None
    jane = accept(service, supporter={"name": "Jane Roe", "email": "jane@example.net", "city": "Lyon", "country": "FR"})
    ali = accept(service, supporter={"name": "Ali Demir", "email": "ali@example.org"}, message=None)
    now = datetime.now(UTC)
    # Claimed in the other order than accepted, so a claim reading the wrong appeal would show.
    second = service.ledger.lifecycle.claim(ali.deliveries[0].id, "w1", now)
    first = service.ledger.lifecycle.claim(jane.deliveries[0].id, "w1", now)
    assert first is not None and second is not None
    assert first.supporter == service.ledger.views.supporter(jane.appeal_id)
    assert first.supporter is not None and (first.supporter.name, first.supporter.city) == ("Jane Roe", "Lyon")
    assert second.supporter is not None
    assert (second.supporter.name, second.supporter.email, second.supporter.message) == (
        "Ali Demir",
        "ali@example.org",
        None,
    )


def test_mark_queued_after_a_fast_worker_keeps_its_state_but_records_the_enqueue(service):
    service.intake.enqueuer = None  # the test plays intake's enqueue itself, below
    delivery = accept(service).deliveries[0]
    assert row(service, delivery.id).queued_at is None
    now = datetime.now(UTC)
    service.ledger.lifecycle.claim(delivery.id, "w1", now)  # claimed before intake got to mark it queued
    service.ledger.lifecycle.mark_queued([delivery.id], now)
    stored = row(service, delivery.id)
    assert stored.state == State.SENDING
    assert stored.queued_at == now


def test_stale_claim_goes_back_to_planned_with_an_attempt_recorded(service):
    delivery = accept(service).deliveries[0]
    claimed_at = datetime.now(UTC)
    service.ledger.lifecycle.claim(delivery.id, "dead-worker", claimed_at)
    later = claimed_at + timedelta(minutes=30)
    assert (
        service.ledger.lifecycle.release_claims(
            later - timedelta(minutes=25), claimed_before=later - timedelta(minutes=25) - timedelta(minutes=11)
        )
        == []
    )
    released = service.ledger.lifecycle.release_claims(later, claimed_before=later - timedelta(minutes=11))
    assert released == [delivery.id]
    stored = row(service, delivery.id)
    assert stored.state == State.PLANNED and stored.claimed_by is None
    [attempt] = service.ledger.views.attempts(delivery.id)
    assert attempt.outcome == "transient" and "stale claim" in attempt.text
    # the released letter is claimed again by a live worker, whose fresh claim is left alone
    assert service.ledger.lifecycle.claim(delivery.id, "live-worker", later) is not None
    assert (
        service.ledger.lifecycle.release_claims(
            later + timedelta(minutes=1), claimed_before=later + timedelta(minutes=1) - timedelta(minutes=11)
        )
        == []
    )


def test_waiting_letters_expire_at_the_deadline_and_sent_ones_stay(service):
    accepted = accept(service)
    sent, waiting = accepted.deliveries[0], accepted.deliveries[1]
    now = datetime.now(UTC)
    claim = service.ledger.lifecycle.claim(sent.id, "w1", now)
    service.ledger.lifecycle.finish(claim, Result(Event.SENT, "sent"), worker="w1", started_at=now, now=now)
    deadline = service.catalog.deadline_at(accepted.campaign, accepted.section)
    assert service.ledger.lifecycle.expire(accepted.campaign, accepted.section, deadline, now) == 0
    assert service.ledger.lifecycle.expire(accepted.campaign, accepted.section, deadline, deadline) == 1
    assert row(service, waiting.id).state == State.EXPIRED
    assert row(service, sent.id).state == State.SENT


def test_personal_data_is_purged_after_retention_once_every_letter_is_final(service):
    accepted = accept(service, message="They took my brother")
    long_ago = datetime.now(UTC) + timedelta(days=service.settings.pii_retention_days + 1)
    # letters still waiting: nothing is purged, the letters still need the name and message
    assert (
        service.ledger.housekeeping.purge_personal_data(long_ago, timedelta(days=service.settings.pii_retention_days))
        == 0
    )
    now = datetime.now(UTC)
    for d in accepted.deliveries:
        claim = service.ledger.lifecycle.claim(d.id, "w1", now)
        sent = Result(Event.SENT, "sent", remote_id=f"remote-{d.id}")
        service.ledger.lifecycle.finish(claim, sent, worker="w1", started_at=now, now=now)
    retention = timedelta(days=service.settings.pii_retention_days)
    assert service.ledger.housekeeping.purge_personal_data(now, retention) == 0  # not old enough yet
    # A fax accepted by its gateway is not settled until the gateway's report: its letter may
    # still be tried again, and needs the supporter's name and message for that.
    fax = next(d for d in accepted.deliveries if d.channel == "fax")
    assert service.ledger.housekeeping.purge_personal_data(long_ago, retention) == 0
    delivered = Result(Event.DELIVERED, "sent", text="delivered")
    assert service.ledger.lifecycle.settle(fax.id, f"remote-{fax.id}", delivered, now=now)
    assert service.ledger.housekeeping.purge_personal_data(long_ago, retention) == 1
    with service.ledger.session() as s:
        appeal = s.scalars(select(Appeal).where(Appeal.id == accepted.appeal_id)).one()
        assert (appeal.supporter_name, appeal.supporter_email, appeal.message, appeal.supporter_city) == (
            None,
            None,
            None,
            None,
        )
        assert appeal.pii_purged_at is not None
        assert appeal.supporter_ref  # duplicates are still recognised after the purge
    # counters and the appeal view survive the purge
    assert service.ledger.views.counters(accepted.campaign).as_json()["appeals"] == 1


def test_purged_appeal_still_blocks_a_duplicate(service):
    body = appeal_body()
    accepted = service.intake.submit(body)
    now = datetime.now(UTC)
    for d in accepted.deliveries:
        claim = service.ledger.lifecycle.claim(d.id, "w1", now)
        service.ledger.lifecycle.finish(claim, Result(Event.SENT, "sent"), worker="w1", started_at=now, now=now)
    service.ledger.housekeeping.purge_personal_data(now + timedelta(days=365), timedelta(days=1))
    from dispatcher.errors import DuplicateAppeal

    again = appeal_body(supporter=body["supporter"])
    try:
        service.intake.submit(again)
    except DuplicateAppeal as exc:
        assert exc.appeal_id == accepted.appeal_id
    else:
        raise AssertionError("a purged appeal no longer blocked a duplicate")


def test_closing_a_campaign_cancels_every_waiting_letter_and_refuses_new_appeals(service):
    from dispatcher.errors import CampaignClosed

    us = accept(service)
    ch_body = appeal_body(section="ch", language="de")
    ch_body["supporter"]["country"] = "CH"
    ch = service.intake.submit(ch_body)
    now = datetime.now(UTC)
    sent = us.deliveries[0]
    claim = service.ledger.lifecycle.claim(sent.id, "w1", now)
    service.ledger.lifecycle.finish(claim, Result(Event.SENT, "sent"), worker="w1", started_at=now, now=now)

    cancelled = service.ledger.controls.close_campaign(us.campaign, "detainee released", now)
    assert cancelled == len(us.deliveries) - 1 + len(ch.deliveries)
    assert row(service, sent.id).state == State.SENT  # what went out stays out
    for d in [*us.deliveries[1:], *ch.deliveries]:
        stored = row(service, d.id)
        assert stored.state == State.CANCELLED and stored.last_text == "campaign closed: detainee released"
    assert service.ledger.controls.close_campaign(us.campaign, "again", now) is None
    try:
        service.intake.submit(appeal_body())
    except CampaignClosed as exc:
        assert exc.status == 410 and "detainee released" in exc.message
    else:
        raise AssertionError("a closed campaign accepted an appeal")


def test_worker_expires_a_letter_whose_deadline_passed_while_it_waited(service):
    from dispatcher.app import Service

    accepted = service.intake.submit(appeal_body())
    email = next(d for d in accepted.deliveries if d.channel == "email")
    deadline = service.catalog.deadline_at(accepted.campaign, accepted.section)
    # a worker whose clock says the deadline has passed (same catalog, same ledger)
    late = Service(service.settings, environ=service.environ, clock=lambda: deadline + timedelta(seconds=1))
    late.catalog_override = service.catalog
    handle = late.worker(threads=1)
    try:
        handle.processor(email.id)
    finally:
        handle.loop.stop()
    stored = row(service, email.id)
    assert stored.state == State.EXPIRED and "deadline" in stored.last_text


def test_deliveries_are_listed_filtered_and_paged_for_operators(service):
    from dispatcher.ledger.views import DeliveryFilter

    service.intake.enqueuer = None
    appeals = [accept(service, client_ref=f"page-{n}") for n in range(5)]
    emails = {d.id for a in appeals for d in a.deliveries if d.channel == "email"}
    now = datetime.now(UTC)
    sent = sorted(emails)[0]
    claim = service.ledger.lifecycle.claim(sent, "w1", now)
    service.ledger.lifecycle.finish(claim, Result(Event.SENT, "sent"), worker="w1", started_at=now, now=now)

    where = DeliveryFilter(campaign=appeals[0].campaign, channel="email", states=(State.PLANNED,))
    seen, after, pages = [], None, 0
    while True:
        page = service.ledger.views.deliveries(where, after=after, limit=2)
        assert page.total == len(emails) - 1
        seen += [d.id for d in page.items]
        assert all(d.channel == "email" and d.state == State.PLANNED for d in page.items)
        pages += 1
        if page.next_after is None:
            break
        after = page.next_after
    assert sorted(seen) == sorted(emails - {sent}) and pages == 2
    [only] = service.ledger.views.deliveries(DeliveryFilter(states=(State.SENT,))).items
    assert only.id == sent and only.sent_at is not None


def test_the_workers_claim_and_finish_store_and_read_values_as_the_orm_does(service):
    """The claim, the attempt row and the finish run as prepared statements on the driver's
    cursor (dispatcher/ledger/prepared.py): what they write, the ORM reads back unchanged, and
    what the claim returns is what the ORM reads; a whole second (no microseconds) included."""
    from dispatcher.ledger.models import Attempt

    service.intake.enqueuer = None
    delivery = accept(service).deliveries[0]
    claimed_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    claim = service.ledger.lifecycle.claim(delivery.id, "w1", claimed_at)
    assert claim is not None
    stored = row(service, delivery.id)
    assert (claim.claimed_at, claim.created_at, claim.queued_at) == (claimed_at, stored.created_at, stored.queued_at)
    assert claim.claimed_at is not None and claim.claimed_at.tzinfo is not None
    assert (claim.recipient, claim.message_id, claim.attempt) == (stored.recipient, stored.message_id, 1)
    retry_at = claimed_at + timedelta(minutes=5, microseconds=7)
    finished = claimed_at + timedelta(milliseconds=250)
    retry = Result(Event.RETRY, "transient", code=451, text="4.3.0 try later", next_attempt_at=retry_at)
    # the finish matches the claim by its time as the claim stored it: it moves the letter
    moved = service.ledger.lifecycle.finish(claim, retry, worker="w1", started_at=claimed_at, now=finished)
    assert moved is State.PLANNED
    stored = row(service, delivery.id)
    assert (stored.state, stored.claimed_by, stored.claimed_at) == ("planned", None, None)
    assert (stored.next_attempt_at, stored.updated_at, stored.last_code) == (retry_at, finished, "451")
    with service.ledger.session() as s:
        tries = s.scalars(select(Attempt).where(Attempt.delivery_id == delivery.id)).all()
    assert [(t.number, t.started_at, t.duration_ms, t.outcome, t.code, t.worker, t.pages) for t in tries] == [
        (1, claimed_at, 250.0, "transient", "451", "w1", None)
    ]
    # a finish whose claim was taken back meanwhile moves nothing, and its try is recorded all the same
    later = claimed_at + timedelta(minutes=6)
    second = service.ledger.lifecycle.claim(delivery.id, "w1", later)
    assert second is not None and second.attempt == 2
    assert service.ledger.lifecycle.release_claims(later, workers=["w1"]) == [delivery.id]
    sent = Result(Event.SENT, "sent", code=250, text="2.0.0 Ok: queued as Q1", remote_id="Q1")
    assert service.ledger.lifecycle.finish(second, sent, worker="w1", started_at=later, now=later) is None
    with service.ledger.session() as s:
        late = s.scalars(select(Attempt).where(Attempt.delivery_id == delivery.id, Attempt.outcome == "sent")).all()
    assert [(t.number, t.worker, t.remote_id, t.started_at) for t in late] == [(2, "w1", "Q1", later)]
    assert row(service, delivery.id).state == "planned"
