"""The benchmarks' historical ledger (bench/history.py, ``--history N`` of bench/throughput.py and
bench/intake.py) and their naive actor (bench/naive_actor.py): the history looks to the service
like the letters it sent itself, and the naive actor delivers every letter it was given.

SQLite and PostgreSQL, the real redis-server, the benchmarks' own aiosmtpd sink in its process.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from dispatcher.app import Service
from dispatcher.ledger.tables import AP, A, D
from tests.support.services import RedisServer

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import history  # noqa: E402
import throughput  # noqa: E402

RECIPIENTS = [("official-1", "official-1@example.org"), ("official-2", "official-2@example.org")]


def test_history_is_a_ledger_the_service_could_have_written(service: Service) -> None:
    now = datetime.now(UTC)
    fill = history.fill_history(
        service.ledger.engine,
        1200,
        campaign="BENCH",
        section="bench",
        recipients=RECIPIENTS,
        sender_domain="bench.example.org",
        days=60,
        retention_days=30,
        chunk=500,  # several chunks, the last one short
        now=now,
    )
    assert (fill.appeals, fill.deliveries, fill.attempts) == (1200, 2400, 2400)
    with service.ledger.engine.connect() as conn:
        appeals = conn.execute(select(AP.c.supporter_ref, AP.c.created_at, AP.c.supporter_email)).all()
        letters = conn.execute(
            select(D.c.recipient, D.c.state, D.c.channel, func.count()).group_by(D.c.recipient, D.c.state, D.c.channel)
        ).all()
        tries = conn.execute(
            select(A.c.outcome, func.count(), func.count(A.c.delivery_id.distinct())).group_by(A.c.outcome)
        ).one()
        letters_per_appeal = set(
            conn.execute(select(func.count()).select_from(D).group_by(D.c.appeal_id)).scalars().all()
        )
    assert len({a.supporter_ref for a in appeals}) == 1200
    assert sorted(letters) == [
        ("official-1@example.org", "sent", "email", 1200),
        ("official-2@example.org", "sent", "email", 1200),
    ]
    assert tuple(tries) == ("sent", 2400, 2400)
    assert letters_per_appeal == {2}
    created = sorted(a.created_at for a in appeals)
    # spread over the past 60 days, the newest an hour old: the run's own rows come after it
    assert now - timedelta(days=60, minutes=1) <= created[0] < now - timedelta(days=59)
    assert now - timedelta(hours=1, minutes=1) <= created[-1] <= now - timedelta(hours=1)
    old = [a for a in appeals if a.created_at < now - timedelta(days=30)]
    assert 550 < len(old) < 650 and all(a.supporter_email is None for a in old)
    # the reconciler's retention purge finds nothing left to do: the history is as it leaves it
    assert service.ledger.housekeeping.purge_personal_data(now, timedelta(days=30)) == 0
    assert history.count_history(service.ledger.engine, now) == 1200


def test_naive_actor_sends_every_letter_it_was_given(tmp_path: Path, redis_server: RedisServer) -> None:
    from comparisons import run_naive_actor

    with throughput.Sink(tmp_path, "sink") as sink:
        result = run_naive_actor(
            30, sink, redis_url=redis_server.url, workers=1, threads=2, workdir=tmp_path, timeout=120
        )
        status = sink.wait_for(30)
    assert result.sink_messages == 30
    assert status["messages"] == 30 and status["duplicates"] == 0 and status["no_message_id"] == 0
    assert result.rate > 0
