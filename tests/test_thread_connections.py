"""A worker's threads keep their ledger connections between letters (dispatcher/ledger/engine.py,
ThreadConnections): as many as the pool can spare, the others take pooled ones, and a stopped
worker gives every kept connection back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from dispatcher.app import Service
from dispatcher.ledger.engine import KEPT_BESIDE, ThreadConnections, make_engine
from dispatcher.ledger.lifecycle import Result
from dispatcher.ledger.models import State
from dispatcher.ledger.states import Event
from dispatcher.settings import Settings
from tests.conftest import appeal_body


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield made
    made.dispose()


def in_threads(count: int, work: object) -> list[object]:
    results: list[object] = [None] * count
    ready = threading.Barrier(count)

    def run(i: int) -> None:
        ready.wait()
        results[i] = work()  # type: ignore[operator]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_threads_beyond_what_the_pool_can_spare_keep_none_and_close_gives_all_back(engine: Engine) -> None:
    kept = ThreadConnections(engine)
    assert kept.limit == engine.pool.size() - KEPT_BESIDE == 8  # type: ignore[attr-defined]

    got = in_threads(12, kept.get)

    assert sum(conn is not None for conn in got) == 8
    assert engine.pool.checkedout() == 8  # type: ignore[attr-defined]
    kept.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_thread_gets_the_same_connection_until_it_is_dropped(engine: Engine) -> None:
    kept = ThreadConnections(engine)
    first = kept.get()
    assert first is not None and kept.get() is first
    first.invalidate()
    fresh = kept.get()
    assert fresh is not None and fresh is not first
    assert fresh.execute(text("SELECT 1")).scalar() == 1
    kept.close()


def test_a_worker_with_more_threads_than_the_pool_spares_sends_every_letter_and_gives_its_connections_back(
    settings: Settings, environ: dict[str, str]
) -> None:
    service = Service(settings, environ=environ)
    service.ledger.migrate()
    service.intake.enqueuer = None  # planned, due now: the test claims them itself
    letters = [d.id for _ in range(4) for d in service.intake.submit(appeal_body()).deliveries]
    handle = service.worker(threads=12)
    lifecycle = service.ledger.lifecycle
    pending = list(letters)
    lock = threading.Lock()

    def work() -> int:
        done = 0
        while True:
            with lock:
                if not pending:
                    return done
                letter = pending.pop()
            now = datetime.now(UTC)
            claim = lifecycle.claim(letter, "w1", now)
            assert claim is not None
            moved = lifecycle.finish(claim, Result(Event.SENT, "sent", code=250), worker="w1", started_at=now, now=now)
            assert moved is State.SENT
            done += 1

    try:
        assert sum(in_threads(12, work)) == len(letters)  # type: ignore[arg-type]
        assert service.ledger.engine.pool.checkedout() <= 8  # type: ignore[attr-defined]
    finally:
        handle.stop(timeout_ms=5000)
    assert service.ledger.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    service.ledger.dispose()
