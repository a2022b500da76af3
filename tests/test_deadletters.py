"""Dead letters: messages dramatiq gave up on (the actor raised on every retry) are recorded in
the ledger — by the worker's middleware, or, when that write fails too, by the reconciler's
sweep of Redis' dead-letter queue — and their letter still goes out. Real Redis, real worker."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from dispatcher.app import Service
from dispatcher.ledger.models import State
from dispatcher.queue.actors import ACTOR, QUEUE
from dispatcher.queue.deadletters import reason_of_exception, reason_of_traceback
from tests.conftest import appeal_body, email_letters, enqueue, wait_for
from tests.support.services import free_port


class ClaimsFail:
    """The worker's ledger, except that every claim raises: the actor crashes on every run."""

    def __init__(self, ledger: Any):
        self._ledger = ledger
        self.lifecycle = _FailingClaims(ledger.lifecycle)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)


class _FailingClaims:
    def __init__(self, lifecycle: Any):
        self._lifecycle = lifecycle

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("ledger unreachable (test)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lifecycle, name)


def quick_retries(service: Service) -> None:
    """Retry backoffs of milliseconds instead of seconds (four runs in about a second)."""
    service.broker.actors[ACTOR].options.update(min_backoff=20, max_backoff=100)


def xq_size(service: Service) -> int:
    return int(service.broker.client.zcard(f"{service.settings.redis_namespace}:{QUEUE}.XQ"))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_message_dead_lettered_by_the_worker_is_recorded_and_its_letter_still_sent(service, smtp):
    [email] = email_letters(service, 1)
    handle = service.worker(threads=2)
    quick_retries(service)
    ledger = handle.processor.ledger
    handle.processor.ledger = ClaimsFail(ledger)
    handle.start()
    try:
        with capture_logs() as logs:
            enqueue(service, [email])
            [row] = wait_for(service.ledger.views.dead_letters, timeout=10)
        assert row.delivery_id == email
        assert (row.queue, row.actor) == (QUEUE, ACTOR)
        assert row.reason == "RuntimeError: ledger unreachable (test)"
        assert xq_size(service) == 1  # the same message Redis keeps in its dead-letter queue
        # dramatiq ran it 1 + MAX_RETRIES times; the claim never happened, so the letter was still
        # "queued"; recording the dead letter made it due again rather than leaving it for the
        # reconciler's 15-minute requeue
        assert service.ledger.views.state_of(email) == State.PLANNED
        assert service.ledger.views.attempts(email) == []
        events = [e for e in logs if e["event"] == "delivery.dead_lettered"]
        assert len(events) == 1
        assert events[0]["message_id"] == row.message_id and events[0]["delivery"] == email
        assert events[0]["recorded_by"] == "worker" and events[0]["error"] == "RuntimeError"
        assert events[0]["retries"] == 4

        # the database is back: the reconciler releases the letter and it is sent, once
        handle.processor.ledger = ledger
        reconciler = service.reconciler(fresh_grace=timedelta(0))
        assert reconciler.tick() == 1
        wait_for(lambda: service.ledger.views.state_of(email) == State.SENT, timeout=10)
        assert len(smtp.messages) == 1
        # the sweep (run by that tick's housekeeping) found it already recorded
        assert len(service.ledger.views.dead_letters()) == 1
        assert reconciler.sweep_dead_letters() == 0
    finally:
        handle.stop(timeout_ms=5_000)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sweep_records_what_a_worker_without_its_database_could_not(service, environ):
    [email] = email_letters(service, 1)
    # A worker on the same Redis whose database is down: nothing listens on that port.
    down = Service(
        service.settings.but(database_url=f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/ledger"),
        environ=environ,
    )
    handle = down.worker(threads=1)
    quick_retries(down)
    handle.start()
    try:
        with capture_logs() as logs:
            enqueue(service, [email])
            wait_for(lambda: xq_size(service) == 1, timeout=10)
            wait_for(lambda: any(e["event"] == "dead_letter.not_recorded" for e in logs), timeout=5)
    finally:
        handle.stop(timeout_ms=2_000)
        down.ledger.dispose()
    assert service.ledger.views.dead_letters() == []
    # What a dead letter leaves behind: the letter is "queued" and unclaimed, which the reconciler's
    # requeue (15 min) would pick up by itself; nothing is stuck in "sending".
    now = datetime.now(UTC)
    assert service.ledger.views.state_of(email) == State.QUEUED
    assert email in service.ledger.schedule.lost_messages(
        now + timedelta(minutes=15), requeue_after=timedelta(minutes=15), limit=10
    )

    reconciler = service.reconciler()
    with capture_logs() as logs:
        assert reconciler.sweep_dead_letters() == 1
    [row] = service.ledger.views.dead_letters()
    assert row.delivery_id == email and row.actor == ACTOR and row.queue == QUEUE
    assert row.reason.startswith("sqlalchemy.exc.OperationalError: (psycopg.OperationalError)")
    assert len(row.reason) <= 300
    assert abs(row.failed_at - now) < timedelta(seconds=30)
    [event] = [e for e in logs if e["event"] == "delivery.dead_lettered"]
    assert event["recorded_by"] == "sweep" and event["delivery"] == email and event["error"] == "OperationalError"
    assert service.ledger.views.state_of(email) == State.PLANNED  # due again: the next tick releases it
    # idempotent: the same sweep again, and a new reconciler process that remembers nothing
    assert reconciler.sweep_dead_letters() == 0
    assert service.reconciler().sweep_dead_letters() == 0
    assert len(service.ledger.views.dead_letters()) == 1


def test_recording_is_idempotent_and_only_requeues_waiting_letters(service):
    service.intake.enqueuer = None
    accepted = service.intake.submit(appeal_body())
    queued, other = (d.id for d in accepted.deliveries)
    now = datetime.now(UTC)
    service.ledger.lifecycle.mark_queued([queued], now)

    def row(message_id: str, delivery: str) -> dict[str, Any]:
        return {
            "message_id": message_id,
            "delivery_id": delivery,
            "queue": QUEUE,
            "actor": ACTOR,
            "reason": "RuntimeError: boom",
            "failed_at": now,
        }

    assert service.ledger.housekeeping.record_dead_letters([row("m-1", queued), row("m-2", other)], now) == [
        "m-1",
        "m-2",
    ]
    assert service.ledger.housekeeping.record_dead_letters([row("m-1", queued), row("m-3", "dl_gone")], now) == ["m-3"]
    assert service.ledger.housekeeping.record_dead_letters([row("m-1", queued)], now) == []
    assert {r.message_id for r in service.ledger.views.dead_letters()} == {"m-1", "m-2", "m-3"}
    assert service.ledger.views.state_of(queued) == State.PLANNED
    assert service.ledger.views.state_of(other) == State.PLANNED  # was planned: untouched
    # a letter a worker holds is left to its worker (or the stale-claim release)
    claim = service.ledger.lifecycle.claim(queued, "w1", now)
    assert claim is not None
    service.ledger.housekeeping.record_dead_letters([row("m-4", queued)], now)
    assert service.ledger.views.state_of(queued) == State.SENDING


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_deadletters_list_shows_them(service, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", service.settings.database_url)
    monkeypatch.setenv("DISPATCH_VAR_DIR", str(service.settings.var_dir))
    monkeypatch.setenv("COLUMNS", "250")  # rich's table width
    runner = CliRunner()
    empty = runner.invoke(main_cli(), ["deadletters", "list"], catch_exceptions=False)
    assert empty.exit_code == 0 and "no dead letters" in empty.output
    [email] = email_letters(service, 1)
    failed_at = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    service.ledger.housekeeping.record_dead_letters(
        [
            {
                "message_id": "0b5e6c1a-msg",
                "delivery_id": email,
                "queue": QUEUE,
                "actor": ACTOR,
                "reason": "sqlalchemy.exc.OperationalError: (psycopg.OperationalError) connection refused",
                "failed_at": failed_at,
            }
        ],
        datetime.now(UTC),
    )
    table = runner.invoke(main_cli(), ["deadletters", "list"], catch_exceptions=False)
    assert table.exit_code == 0
    for text in ("0b5e6c1a-msg", email, "planned", "deliver", "OperationalError"):
        assert text in table.output, text
    as_json = runner.invoke(main_cli(), ["deadletters", "list", "--json"], catch_exceptions=False)
    [row] = json.loads(as_json.output)
    assert row["message_id"] == "0b5e6c1a-msg" and row["delivery_state"] == "planned"
    assert row["failed_at"] == failed_at.isoformat()


def main_cli() -> Any:
    from dispatcher.cli import main

    return main


def test_reasons_are_one_short_line():
    try:
        raise ValueError("bad value\nsecond line with [SQL: SELECT ...]")
    except ValueError as exc:
        assert reason_of_exception(exc) == "ValueError: bad value"
    tb = (
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "    claim()\n"
        "    ^^^^^^^\n"
        "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) unable to open database file\n"
        "\tIs the server running on that host?\n"
        "[SQL: UPDATE deliveries SET ...]\n"
        "(Background on this error at: https://sqlalche.me/e/20/e3q8)\n"
    )
    assert reason_of_traceback(tb) == (
        "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) unable to open database file"
    )
    assert len(reason_of_exception(RuntimeError("x" * 1000))) == 300
    assert reason_of_traceback(None) is None
