"""The scheduler (the reconciler's pacer) against a real ledger and Redis, on a simulated clock:
it releases each capped recipient's backlog at the pace the forecast announced, and only one
reconciler releases at a time."""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from dispatcher.app import Service
from dispatcher.config.loader import load_catalog
from dispatcher.ledger.lifecycle import Result
from dispatcher.ledger.models import Delivery, State
from dispatcher.ledger.states import Event
from dispatcher.policy.pacing import release_times
from dispatcher.queue.forecast import campaign_forecast
from tests.conftest import ROOT, appeal_body, make_settings, wait_for

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

CAMPAIGN = "UA-002-19-DEMO"
#: a Monday; the Swiss section's deadline (42 days after the issue date) falls 8 days later
START = datetime(2026, 3, 2, tzinfo=UTC)
ISSUED = START.date() - timedelta(days=34)


class SimClock:
    def __init__(self, at: datetime):
        self.at = at

    def __call__(self) -> datetime:
        return self.at


class SimWorker:
    """An enqueuer whose worker sends each letter the instant it is released (simulated time)."""

    def __init__(self, service: Service, clock: SimClock):
        self.service = service
        self.clock = clock
        self.released: list[tuple[datetime, str]] = []

    def send(self, ids):
        for delivery_id in ids:
            now = self.clock()
            claim = self.service.ledger.lifecycle.claim(delivery_id, "sim", now)
            assert claim is not None
            self.service.ledger.lifecycle.finish(
                claim, Result(Event.SENT, "sent"), worker="sim", started_at=now, now=now
            )
            self.released.append((now, delivery_id))
        return list(ids)


def swiss_service(tmp_path, database_url, redis_server, environ, clock: SimClock) -> Service:
    """The real config with a 2/hour cap on fax numbers, on the simulated clock."""
    settings = make_settings(
        tmp_path, database_url=database_url, redis_url=redis_server.url, smtp_port=1, fax_limits=("2/hour",)
    )
    catalog = load_catalog(ROOT / "config", ROOT / "templates").with_demo_copies(ISSUED)
    service = Service(settings, environ=environ, clock=clock, catalog_override=catalog)
    service.ledger.migrate()
    return service


def swiss_appeals(service: Service, n: int) -> None:
    for k in range(n):
        body = appeal_body(section="ch", language="de", client_ref=f"sim-{k}")
        body["supporter"]["country"] = "CH"
        service.intake.submit(body)


def most_in_any_window(times: list[datetime], window: timedelta) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_forecast_for_500_faxes_at_2_per_hour_is_what_the_scheduler_does(tmp_path, database_url, redis_server, environ):
    clock = SimClock(START)
    service = swiss_service(tmp_path, database_url, redis_server, environ, clock)
    deadline = service.catalog.deadline_at(CAMPAIGN, "ch")
    assert timedelta(days=8) < deadline - START < timedelta(days=9)

    # 500 appeals accepted while the queue was down: 500 letters wait for each of the two fax lines.
    service.intake.enqueuer = None
    swiss_appeals(service, 500)
    forecasts = {
        r.forecast.recipient: r.forecast
        for r in campaign_forecast(ledger=service.ledger, pacer=service.pacer, campaign=CAMPAIGN, now=START)
    }
    plans = {}
    for key in forecasts:
        channel, _, recipient = key.partition(":")
        target = service.pacer.target_of(CAMPAIGN, "ch", "president" if "7495" in recipient else "embassy-ru")
        plans[key] = release_times(service.pacer.backlog(channel, recipient, target, START).load, START)
    faxes = {k: f for k, f in forecasts.items() if k.startswith("fax:")}
    assert len(faxes) == 2
    for f in faxes.values():
        # 2/hour from Monday 00:00 to the deadline (Tuesday of the next week, 23:00 UTC) is 430
        # slots: the forecast says so, and that 70 letters would miss it.
        assert (f.waiting, f.rate_per_hour, f.fits_count, f.shortfall) == (500, 2.0, 430, 70)
        assert f.first_at == START

    worker = SimWorker(service, clock)
    reconciler = service.reconciler(fresh_grace=timedelta(0), housekeeping_every=6 * 3600)
    reconciler.enqueuer = worker
    # Ticks on the 30-minute grid the 2/hour cap releases on; a real reconciler ticks every second.
    tick = timedelta(minutes=30)
    while clock.at <= deadline + tick:
        reconciler.tick()
        clock.at += tick
    reconciler.housekeeping(clock.at)

    with service.ledger.session() as s:
        route = {i: r for i, r in s.execute(select(Delivery.id, Delivery.channel + ":" + Delivery.recipient))}
        states = s.execute(select(Delivery.channel + ":" + Delivery.recipient, Delivery.state)).all()
    went: dict[str, list[datetime]] = defaultdict(list)
    for at, delivery_id in worker.released:
        went[route[delivery_id]].append(at)
    for key, f in faxes.items():
        times = went[key]
        assert len(times) == f.fits_count
        assert min(times) == f.first_at
        assert most_in_any_window(times, timedelta(hours=1)) == 2
        # every release at its planned time (the ticks fall on the 30-minute grid exactly)
        assert sorted(times) == sorted(t for t in plans[key] if t < deadline)
        expired = sum(1 for k, state in states if k == key and state == State.EXPIRED)
        assert expired == f.shortfall


def test_a_backlog_far_from_its_deadline_is_spread_towards_it(tmp_path, database_url, redis_server, environ):
    # 30 letters, 8 days: the caps would allow all of them in 15 hours. The scheduler spreads them
    # towards the deadline instead, no slower than a quarter of the cap (one every 2 hours), as
    # the forecast says.
    clock = SimClock(START)
    service = swiss_service(tmp_path, database_url, redis_server, environ, clock)
    service.intake.enqueuer = None
    swiss_appeals(service, 30)
    forecasts = campaign_forecast(ledger=service.ledger, pacer=service.pacer, campaign=CAMPAIGN, now=START)
    fax = next(r.forecast for r in forecasts if r.forecast.recipient.startswith("fax:+7"))
    assert fax.fits and fax.last_at is not None
    assert fax.rate_per_hour == 0.5

    worker = SimWorker(service, clock)
    reconciler = service.reconciler(fresh_grace=timedelta(0), housekeeping_every=6 * 3600)
    reconciler.enqueuer = worker
    tick = timedelta(minutes=1)
    while clock.at <= fax.last_at + tick:
        reconciler.tick()
        clock.at += tick
    with service.ledger.session() as s:
        moscow = set(s.scalars(select(Delivery.id).where(Delivery.recipient.like("+7%"))).all())
    times = sorted(at for at, i in worker.released if i in moscow)
    assert len(times) == 30
    # The last one goes when the forecast said, within a tick.
    assert abs(times[-1] - fax.last_at) <= tick
    assert times[-1] - times[0] == 29 * timedelta(hours=2)


def test_a_letter_to_a_recipient_with_a_backlog_joins_it_instead_of_jumping_the_queue(service):
    service.gate.settings = service.settings.but(fax_limits=("2/hour",))
    # Within the caps letters go straight to the queue (the gate checks the caps at send time).
    accepted = [service.intake.submit(appeal_body(section="ch", language="de")) for _ in range(2)]
    assert {service.ledger.views.state_of(d.id) for a in accepted for d in a.deliveries} == {State.QUEUED}
    # Once the caps held letters back, a backlog waits in the ledger ...
    enqueuer, service.intake.enqueuer = service.intake.enqueuer, None
    held = service.intake.submit(appeal_body(section="ch", language="de"))
    service.intake.enqueuer = enqueuer
    # ... and the next letters to those lines join it, for the pacer to release in their turn.
    later = [service.intake.submit(appeal_body(section="ch", language="de")) for _ in range(2)]
    states = {service.ledger.views.state_of(d.id) for a in [held, *later] for d in a.deliveries}
    assert states == {State.PLANNED}
    # a recipient without caps (the ambassador's email here) is never held back
    us = [service.intake.submit(appeal_body()) for _ in range(2)]
    emails = [d for a in us for d in a.deliveries if d.channel == "email"]
    assert len(emails) == 2 and all(service.ledger.views.state_of(d.id) == State.QUEUED for d in emails)


def test_a_retry_in_its_backoff_is_not_released_early_by_the_pacer(service):
    service.gate.settings = service.settings.but(fax_limits=("2/hour",))
    service.intake.enqueuer = None
    accepted = service.intake.submit(appeal_body(section="ch", language="de"))
    now = datetime.now(UTC)
    later = now + timedelta(hours=3)
    with service.ledger.session() as s:
        for d in s.scalars(select(Delivery).where(Delivery.appeal_id == accepted.appeal_id)):
            d.attempts, d.next_attempt_at = 1, later  # a busy line: tried once, next try in 3 hours
    released: list[str] = []
    reconciler = service.reconciler(fresh_grace=timedelta(0))
    reconciler.enqueuer = type("Q", (), {"send": lambda self, ids: released.extend(ids) or list(ids)})()
    assert reconciler.tick() == 0
    reconciler.clock = lambda: later
    assert reconciler.tick() == len(accepted.deliveries)


def test_only_one_reconciler_releases_and_another_takes_over_when_it_stops(service):
    service.intake.enqueuer = None
    a = service.reconciler(fresh_grace=timedelta(0), lease_seconds=0.5)
    b = service.reconciler(fresh_grace=timedelta(0), lease_seconds=0.5)
    seen: dict[str, list[str]] = {"a": [], "b": []}
    for name, r in (("a", a), ("b", b)):
        r.enqueuer = type("Q", (), {"send": lambda self, ids, n=name: seen[n].extend(ids) or list(ids)})()
    service.intake.submit(appeal_body())
    letters = 2  # the us section writes to the President by fax and the ambassador by email
    assert a.tick() == letters and b.tick() == 0  # b stands by while a holds the lease
    assert b.lease is not None and not b.lease.held
    # a dies without a word: its lease runs out and b takes over
    service.intake.submit(appeal_body())
    wait_for(lambda: b.tick() == letters, timeout=3)
    assert len(seen["a"]) == len(seen["b"]) == letters
    assert a.tick() == 0  # and a, back, stands by
    # a clean stop hands the lease over at once
    stop = threading.Event()
    stop.set()
    b.run(stop)
    service.intake.submit(appeal_body())
    assert a.tick() == letters
