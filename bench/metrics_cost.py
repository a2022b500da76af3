"""What the metrics cost: the worker's in-memory counting per letter, and the API's scrape-time
read of the ledger (one GROUP BY over ``deliveries``) at several ledger sizes, on SQLite and,
with ``--postgres``, on a fresh PostgreSQL database.

    .venv/bin/python bench/metrics_cost.py [--rows 10000,100000,1000000] [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dispatcher.ledger.stats import Stats  # noqa: E402
from dispatcher.ledger.store import Ledger  # noqa: E402
from dispatcher.ledger.tables import D  # noqa: E402
from dispatcher.metrics.instruments import Metrics  # noqa: E402
from tests.support.services import PostgresDatabase  # noqa: E402

STATES = ["sent"] * 12 + ["delivered"] * 4 + ["planned", "queued", "failed", "bounced", "expired", "cancelled"]


def counting(n: int = 200_000) -> float:
    """Microseconds per letter for what the worker does for metrics after recording a try."""
    worker = Metrics().worker
    started = time.perf_counter()
    for i in range(n):
        worker.tried("email", "sent", "sent", None)
        worker.send_seconds.labels("email").observe(0.012 + (i % 7) * 0.001)
    return (time.perf_counter() - started) / n * 1e6


def fill(ledger: Ledger, rows: int) -> None:
    now = datetime.now(UTC)
    batch = []
    with ledger.engine.begin() as conn:
        for i in range(rows):
            state = STATES[i % len(STATES)]
            batch.append(
                {
                    "id": f"dl_{uuid.uuid4().hex}",
                    "appeal_id": None,
                    "kind": "letter",
                    "campaign": "UA-BENCH",
                    "section": ("us", "ch", "ca", "uk")[i % 4],
                    "target": "t",
                    "channel": "email" if i % 3 else "fax",
                    "recipient": f"r{i % 50}",
                    "language": "en",
                    "state": state,
                    "attempts": 1,
                    "next_attempt_at": now - timedelta(seconds=i % 600),
                    "message_id": f"<{i}@bench>",
                    "created_at": now,
                    "updated_at": now,
                    "queued_at": now if state == "queued" else None,
                }
            )
            if len(batch) == 5000:
                conn.execute(D.insert(), batch)
                batch = []
        if batch:
            conn.execute(D.insert(), batch)


def scrape_ms(ledger: Ledger, repeat: int = 15) -> float:
    stats = Stats(ledger.engine)
    stats.snapshot(datetime.now(UTC))  # warm
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        stats.snapshot(datetime.now(UTC))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--postgres", default=None, help="admin URL of a PostgreSQL server")
    args = parser.parse_args()
    print(f"worker: metrics per letter {counting():.2f} µs (outcome counter + send histogram)")
    for rows in (int(r) for r in args.rows.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            ledger = Ledger(f"sqlite:///{tmp}/ledger.sqlite3")
            ledger.migrate()
            fill(ledger, rows)
            print(f"sqlite     {rows:>9} deliveries: ledger snapshot {scrape_ms(ledger):8.1f} ms (median)")
            ledger.dispose()
        if args.postgres:
            with PostgresDatabase(args.postgres, prefix="dispatch_bench") as db:
                ledger = Ledger(db.url)
                ledger.migrate()
                fill(ledger, rows)
                with ledger.engine.begin() as conn:
                    conn.exec_driver_sql("ANALYZE deliveries")
                print(f"postgresql {rows:>9} deliveries: ledger snapshot {scrape_ms(ledger):8.1f} ms (median)")
                ledger.dispose()


if __name__ == "__main__":
    main()
