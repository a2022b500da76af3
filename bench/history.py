"""A ledger with a past: N historical appeals written straight into the ledger's own tables.

Issue 11 asks whether intake and the worker path slow down as a section's ledger grows, which
it does with every campaign. ``fill_history`` writes, through the ledger's Core tables
(``dispatcher.ledger.tables``: AP, D, A), what that past looks like:

* ``appeals`` appeals in the run's campaign and section, their ``created_at`` spread evenly
  over the ``days`` before the run (the newest an hour old), each with a unique
  ``supporter_ref`` (a keyed hash is 32 hex digits: random ones are as good) and a unique
  ``client_ref``. Appeals older than the retention period have their personal data blanked,
  as the reconciler's purge leaves them; newer ones keep it.
* two letters per appeal, by email, to the SAME two recipients as the run's campaign (its
  first two routes): ``sent``, one try, ``queued_at``/``sent_at`` a second or two after the
  appeal — a letter as the worker leaves it.
* one ``attempts`` row per letter (outcome ``sent``, code 250).

Rows go in with ``executemany`` in chunks of ``chunk`` appeals, one transaction per chunk, in
the order the foreign keys want (appeals, deliveries, attempts). On PostgreSQL the tables are
ANALYZEd afterwards (autovacuum would do it a minute later, in the middle of the measurement);
SQLite gets no statistics, as the service never gathers any there. Then the history goes to disk
(``settle``: SQLite's WAL checkpointed, PostgreSQL's CHECKPOINT, ``sync``), as a ledger's past is.

Used by bench/throughput.py and bench/intake.py (``--history N``); docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, insert, select, text

from dispatcher.ledger.tables import AP, A, D

#: a relay's answer to DATA, as the sink gives it
SENT_TEXT = "2.0.0 Ok: queued"
#: the newest historical appeal is this old: the run's own rows are told apart by created_at
NEWEST = timedelta(hours=1)


@dataclass(frozen=True)
class HistoryFill:
    appeals: int
    deliveries: int
    attempts: int
    seconds: float
    #: then writing it to disk (``settle``)
    settle_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "appeals": self.appeals,
            "deliveries": self.deliveries,
            "attempts": self.attempts,
            "fill_seconds": round(self.seconds, 1),
            "settle_seconds": round(self.settle_seconds, 1),
            "rows_per_s": round((self.appeals + self.deliveries + self.attempts) / max(self.seconds, 1e-9)),
        }


def _hex(n: int) -> str:
    return os.urandom(n).hex()


def fill_history(
    engine: Engine,
    appeals: int,
    *,
    campaign: str,
    section: str,
    recipients: Sequence[tuple[str, str]],
    sender_domain: str,
    language: str = "en",
    days: float = 60.0,
    retention_days: int = 30,
    chunk: int = 5000,
    now: datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> HistoryFill:
    """Write ``appeals`` historical appeals (and two sent letters and their tries each) into the
    migrated ledger behind ``engine``; ``recipients`` are two (target id, email address)."""
    if len(recipients) != 2:
        raise ValueError("history letters go to exactly two recipients")
    now = now or datetime.now(UTC)
    newest = now - NEWEST
    span = timedelta(days=days) - NEWEST
    purged_before = now - timedelta(days=retention_days)
    step = span / max(appeals - 1, 1)  # the first appeal is days old, the last an hour
    oldest = newest - span
    insert_appeal, insert_delivery, insert_attempt = insert(AP), insert(D), insert(A)
    started = time.perf_counter()
    written = 0
    while written < appeals:
        count = min(chunk, appeals - written)
        appeal_rows: list[dict[str, Any]] = []
        delivery_rows: list[dict[str, Any]] = []
        attempt_rows: list[dict[str, Any]] = []
        for i in range(written, written + count):
            created = oldest + step * i
            appeal_id = f"ap_{_hex(16)}"
            purged = created < purged_before
            appeal_rows.append(
                {
                    "id": appeal_id,
                    "campaign": campaign,
                    "section": section,
                    "language": language,
                    "client_ref": f"history-{i}",
                    "supporter_ref": _hex(16),
                    "created_at": created,
                    "supporter_name": None if purged else f"Past Supporter {i}",
                    "supporter_email": None if purged else f"past-supporter-{i}@example.net",
                    "supporter_city": None if purged else "Springfield",
                    "supporter_country": None if purged else "US",
                    "supporter_languages": None,
                    "message": None if purged else "Please release everyone detained for who they are.",
                    "pii_purged_at": created + timedelta(days=retention_days) if purged else None,
                }
            )
            for n, (target, address) in enumerate(recipients):
                delivery_id = f"dl_{_hex(16)}"
                queued = created + timedelta(milliseconds=5)
                started_at = created + timedelta(milliseconds=400 + 300 * n)
                sent = started_at + timedelta(milliseconds=120)
                delivery_rows.append(
                    {
                        "id": delivery_id,
                        "appeal_id": appeal_id,
                        "kind": "letter",
                        "digest_id": None,
                        "campaign": campaign,
                        "section": section,
                        "target": target,
                        "channel": "email",
                        "recipient": address,
                        "language": language,
                        "state": "sent",
                        "attempts": 1,
                        "next_attempt_at": created,
                        "message_id": f"<{delivery_id}@{sender_domain}>",
                        "claimed_by": None,
                        "claimed_at": None,
                        "created_at": created,
                        "updated_at": sent,
                        "queued_at": queued,
                        "sent_at": sent,
                        "last_outcome": "sent",
                        "last_code": "250",
                        "last_text": SENT_TEXT,
                    }
                )
                attempt_rows.append(
                    {
                        "delivery_id": delivery_id,
                        "number": 1,
                        "started_at": started_at,
                        "duration_ms": 120.0,
                        "outcome": "sent",
                        "code": "250",
                        "text": SENT_TEXT,
                        "worker": "history-worker",
                    }
                )
        with engine.begin() as conn:
            conn.execute(insert_appeal, appeal_rows)
            conn.execute(insert_delivery, delivery_rows)
            conn.execute(insert_attempt, attempt_rows)
        written += count
        if progress is not None:
            progress(written)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            for table in (AP, D, A):
                conn.execute(text(f"ANALYZE {table.name}"))
    seconds = time.perf_counter() - started
    return HistoryFill(appeals, 2 * appeals, 2 * appeals, seconds, settle(engine))


def settle(engine: Engine) -> float:
    """Put the history on disk, as a ledger's past is, before anything is measured; returns
    the seconds it took. Without it the run measured the fill's own write-back: the kernel
    flushing the pages the fill left dirty (written back 30 s after), and on SQLite the first
    checkpoint copying the fill's WAL into the file and waiting for its fsync (intake with a
    SQLite history ran at 0.63-0.78x of an empty ledger, with every part of the writer slower
    alike, the enqueue to Redis too)."""
    started = time.perf_counter()
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            # on the driver's connection, outside a transaction (the ledger's engine begins one)
            conn.connection.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]
    elif engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("CHECKPOINT")
    os.sync()
    return time.perf_counter() - started


def count_history(engine: Engine, before: datetime) -> int:
    """Appeals created before ``before`` (the history a run found in its ledger)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(AP).where(AP.c.created_at < before)).scalar_one())


def add_arguments(parser: argparse.ArgumentParser, measured: str) -> None:
    """``--history N``, ``--compare-history`` and ``--history-days`` for a bench that measures
    ``measured`` ("intake", "the pipeline")."""
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        metavar="N",
        help="fill the ledger with N historical appeals (2 sent letters each) before the run (bench/history.py)",
    )
    parser.add_argument(
        "--compare-history",
        action="store_true",
        help=f"with --history N: each repetition measures {measured} on an empty ledger AND on one with N "
        "historical appeals, alternating which goes first",
    )
    parser.add_argument("--history-days", type=float, default=60.0, help="days the history is spread over")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.history < 0 or (args.compare_history and not args.history):
        parser.error("--history N ≥ 0; --compare-history needs --history N > 0")
    if args.history_days * 24 < 2:
        parser.error("--history-days: at least 2 hours")


def recorded_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The history options as a results line records them."""
    return {
        "history": args.history or None,
        "compare_history": args.compare_history,
        "history_days": args.history_days if args.history else None,
    }
