"""The ledger on PostgreSQL when its connections die under it (a server restart, an idle
connection cut by a firewall, an operator's pg_terminate_backend).

The pool pings a connection only when it sat unused beyond a threshold
(dispatcher/ledger/engine.py); a connection that dies within it fails its statement, which
invalidates it and every connection pooled before it, and the worker's claim and finish try once
more on a fresh one (dispatcher/ledger/lifecycle.py). Each test kills the backends of its own
database from another connection, as an operator would.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, make_url, select
from sqlalchemy.exc import DBAPIError

import dispatcher.ledger.engine as engine_module
from dispatcher.app import Service
from dispatcher.ledger.lifecycle import Result
from dispatcher.ledger.models import Delivery, State
from dispatcher.ledger.states import Event
from dispatcher.ledger.tables import A
from dispatcher.settings import Settings
from tests.conftest import appeal_body, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]


@pytest.fixture
def service(settings: Settings, environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """The service, its pool pinging only connections idle for an hour: within these tests no
    ping saves a dead connection, the retry on a fresh one must."""
    monkeypatch.setattr(engine_module, "IDLE_PING_SECONDS", 3600.0)
    svc = Service(settings, environ=environ)
    svc.ledger.migrate()
    yield svc
    svc.ledger.dispose()


def kill_backends(database_url: str) -> int:
    """Terminate every other connection to the database (and wait until they are gone)."""
    libpq = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def backend_pid(service: Service) -> int:
    with service.ledger.engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    return int(pid)


def planned_letter(service: Service) -> str:
    service.intake.enqueuer = None  # planned, due now: no queue needed
    return service.intake.submit(appeal_body()).deliveries[0].id


def delivery(service: Service, delivery_id: str) -> Delivery:
    with service.ledger.session() as s:
        found = s.get(Delivery, delivery_id)
    assert found is not None
    return found


def attempts(service: Service, delivery_id: str) -> list[str]:
    with service.ledger.engine.connect() as conn:
        return list(conn.execute(select(A.c.outcome).where(A.c.delivery_id == delivery_id)).scalars())


SENT = Result(Event.SENT, "sent", code=250, text="2.0.0 queued")


def test_a_claim_succeeds_on_a_pool_whose_connections_were_killed(service: Service) -> None:
    letter = planned_letter(service)
    before = backend_pid(service)
    assert kill_backends(service.settings.database_url) >= 1

    claim = service.ledger.lifecycle.claim(letter, "w1", datetime.now(UTC))

    assert claim is not None and claim.attempt == 1
    row = delivery(service, letter)
    assert (row.state, row.claimed_by) == (State.SENDING, "w1")
    assert backend_pid(service) != before


def test_a_finish_succeeds_on_a_pool_whose_connections_were_killed(service: Service) -> None:
    letter = planned_letter(service)
    now = datetime.now(UTC)
    claim = service.ledger.lifecycle.claim(letter, "w1", now)
    assert claim is not None
    assert kill_backends(service.settings.database_url) >= 1

    moved = service.ledger.lifecycle.finish(claim, SENT, worker="w1", started_at=now, now=now)

    assert moved is State.SENT
    row = delivery(service, letter)
    assert (row.state, row.claimed_by, row.attempts) == (State.SENT, None, 1)
    assert attempts(service, letter) == ["sent"]


def test_a_finish_whose_answer_was_lost_is_recorded_once(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection dies right after the finish's statement was committed (on PostgreSQL the
    statement is a transaction of its own): only its answer is lost. The second try finds it,
    and neither repeats the attempt row nor reports the letter as taken back."""
    letter = planned_letter(service)
    now = datetime.now(UTC)
    claim = service.ledger.lifecycle.claim(letter, "w1", now)
    assert claim is not None
    execute = psycopg.Cursor.execute

    def execute_then_lose_the_answer(cursor: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        result = execute(cursor, query, *args, **kwargs)
        if "attempt_row" in str(query):  # the finish
            monkeypatch.setattr(psycopg.Cursor, "execute", execute)
            assert cursor.connection.autocommit  # committed already
            kill_backends(service.settings.database_url)
            execute(cursor, "SELECT 1")  # what the client meets next: the connection is gone
        return result

    monkeypatch.setattr(psycopg.Cursor, "execute", execute_then_lose_the_answer)

    moved = service.ledger.lifecycle.finish(claim, SENT, worker="w1", started_at=now, now=now)

    assert moved is State.SENT
    assert delivery(service, letter).state == State.SENT
    assert attempts(service, letter) == ["sent"]


def test_a_dead_connection_met_by_a_prepared_statement_fails_as_execute_would(service: Service) -> None:
    """The worker's statements run on the driver's cursor (prepared.py), past
    Connection.execute: a lost connection is still reported as execute reports it (the
    statement that met it, the server's reason, connection_invalidated) and not pooled again."""
    letter = planned_letter(service)
    lifecycle = service.ledger.lifecycle
    before = backend_pid(service)
    kill_backends(service.settings.database_url)

    with pytest.raises(DBAPIError) as failed, service.ledger.engine.begin() as conn:
        lifecycle._prepared_claim.run(conn, {"p_delivery_id": letter, "p_now": datetime.now(UTC), "p_worker": "w1"})

    assert failed.value.connection_invalidated
    # the claim's own error, not the ROLLBACK's that fails after it on the dead connection
    assert failed.value.statement == lifecycle._prepared_claim.sql
    assert isinstance(failed.value.orig, psycopg.OperationalError)
    assert backend_pid(service) != before  # the next transaction has a live connection
    assert delivery(service, letter).state == State.PLANNED


class Clock:
    """engine.py's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_only_a_connection_idle_beyond_the_threshold_is_pinged_and_a_dead_one_replaced(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(engine_module, "time", clock)
    engine = engine_module.make_engine(database_url)
    pings: list[str] = []
    real_ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda c: pings.append("ping") or real_ping(c))
    threshold = engine_module.IDLE_PING_SECONDS
    try:
        with engine.connect() as conn:
            first = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        clock.now += threshold / 2
        with engine.connect() as conn:  # in use a moment ago: no round trip for a ping
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() == first
        assert pings == []

        kill_backends(database_url)
        clock.now += threshold * 2
        # Not retried by anyone: only the ping on checkout can save this statement.
        with engine.connect() as conn:
            second = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()

        assert second != first
        assert pings == ["ping"]
    finally:
        engine.dispose()


def test_a_letter_whose_connections_die_mid_send_goes_out_once_and_is_recorded_sent(
    service: Service, smtp: Any
) -> None:
    """The backends die while the relay holds the letter's DATA (between the claim and the
    finish): the letter is recorded sent, once, and neither a redelivered message nor the
    stale-claim sweep sends it again."""
    service.intake.enqueuer = None
    accepted = service.intake.submit(appeal_body())
    letter = next(d.id for d in accepted.deliveries if d.channel == "email")
    handle = service.worker(threads=1)
    processor = handle.processor
    smtp.hold_data(2.0)  # recorded by the relay at once, its 250 two seconds later
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            processor(letter)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=deliver)
    try:
        worker.start()
        wait_for(lambda: len(smtp.messages) == 1, timeout=10)
        assert delivery(service, letter).state == State.SENDING
        assert kill_backends(service.settings.database_url) >= 1
        worker.join(timeout=30)
        assert not worker.is_alive()
        assert errors == []

        row = delivery(service, letter)
        assert (row.state, row.claimed_by) == (State.SENT, None)
        assert attempts(service, letter) == ["sent"]

        processor(letter)  # the message delivered again
        later = datetime.now(UTC) + timedelta(hours=1)
        assert service.ledger.lifecycle.release_claims(later, claimed_before=later) == []
        assert [str(m.message["X-Dispatch-Delivery"]) for m in smtp.messages] == [letter]
        with service.ledger.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(A).where(A.c.delivery_id == letter)).scalar() == 1
    finally:
        handle.loop.run(handle.channels.get("email").aclose(), timeout=10)
        handle.loop.stop()


def test_a_worker_lets_the_server_keep_generic_plans_and_other_processes_plan_each_run(
    settings: Settings, environ: dict[str, str]
) -> None:
    """The API's and the reconciler's statements are planned with each execution's values (a
    generic plan chosen on a small ledger kept a sequential scan); a worker's, primary-key
    lookups, keep the server's default, also on connections opened again after a kill."""

    def plan_mode(svc: Service) -> str:
        with svc.ledger.engine.connect() as conn:
            return str(conn.exec_driver_sql("SHOW plan_cache_mode").scalar_one())

    api = Service(settings, environ=environ)
    worker = Service(settings, environ=environ)
    try:
        api.ledger.migrate()
        assert plan_mode(api) == plan_mode(worker) == "force_custom_plan"
        handle = worker.worker(threads=1)
        try:
            assert (plan_mode(api), plan_mode(worker)) == ("force_custom_plan", "auto")
            kill_backends(settings.database_url)
            with contextlib.suppress(DBAPIError):
                plan_mode(worker)  # the pooled connection was killed (unless the idle ping saw it)
            assert plan_mode(worker) == "auto"
        finally:
            handle.loop.stop()
    finally:
        api.ledger.dispose()
        worker.ledger.dispose()


def test_a_workers_kept_connection_found_dead_is_replaced_and_given_back_at_stop(service: Service) -> None:
    """A worker's threads keep their connection between letters (no checkout per claim or
    finish); one the server killed meanwhile fails its claim, which goes again on a fresh one,
    and a stopped worker gives every kept connection back."""
    first, second = planned_letter(service), planned_letter(service)
    handle = service.worker(threads=1)
    try:
        now = datetime.now(UTC)
        claim = service.ledger.lifecycle.claim(first, "w1", now)
        assert claim is not None
        assert service.ledger.lifecycle.finish(claim, SENT, worker="w1", started_at=now, now=now) is State.SENT
        assert service.ledger.engine.pool.checkedout() == 1  # kept by this thread
        assert kill_backends(service.settings.database_url) >= 1

        again = service.ledger.lifecycle.claim(second, "w1", now)

        assert again is not None and delivery(service, second).state == State.SENDING
        assert service.ledger.engine.pool.checkedout() == 1  # the dead one closed, a fresh one kept
    finally:
        handle.stop(timeout_ms=5000)
    assert service.ledger.engine.pool.checkedout() == 0
