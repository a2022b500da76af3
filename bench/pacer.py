"""What pacing costs the reconciler: one tick with large backlogs, against the bare query the
reconciler ran before it paced anything (every planned letter that is due, 1,000 at a time).

    .venv/bin/python bench/pacer.py [--letters 1000,10000,50000] [--recipients 10,100] [--ticks 20]

For each backlog (letters spread over recipients, all planned and due, default caps 30/hour and
200/day, a deadline six weeks away) it measures, on a SQLite ledger and a private Redis:

* ``bare query``: the pre-pacing release query (median of ``--ticks`` runs) — the baseline;
* ``first tick``: the reconciler's first tick, which plans every recipient (cold);
* ``steady tick``: the next ticks, between planned releases (median);
* ``forecast``: ``dispatcher schedule forecast`` for the campaign, every recipient planned in full.

Nothing is sent: the enqueuer only counts. Machines here are noisy, so figures are medians and the
table gives each one as a ratio to the bare query measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import and_, insert, or_, select  # noqa: E402

from dispatcher.app import Service  # noqa: E402
from dispatcher.ledger.models import Appeal, Delivery, State  # noqa: E402
from dispatcher.queue.actors import Enqueuer  # noqa: E402
from dispatcher.queue.forecast import campaign_forecast  # noqa: E402
from dispatcher.settings import Settings  # noqa: E402
from tests.support.services import RedisServer  # noqa: E402

CAMPAIGN = "UA-002-19-DEMO"
console = Console()


class CountingQueue:
    def __init__(self) -> None:
        self.sent = 0

    def send(self, ids: list[str]) -> list[str]:
        self.sent += len(ids)
        return list(ids)


def fill(service: Service, letters: int, recipients: int, now: datetime) -> None:
    """``letters`` planned emails of UA-002-19-DEMO (us → the ambassador's route), spread over
    ``recipients`` addresses, inserted in bulk: intake would take minutes for 50,000."""
    appeals, deliveries = [], []
    for k in range(letters):
        appeal_id = f"ap_{uuid.uuid4().hex}"
        appeals.append(
            {
                "id": appeal_id,
                "campaign": CAMPAIGN,
                "section": "us",
                "language": "en",
                "supporter_ref": uuid.uuid4().hex,
                "created_at": now - timedelta(seconds=letters - k),
                "supporter_name": f"Supporter {k}",
                "supporter_email": f"s{k}@example.org",
            }
        )
        delivery_id = f"dl_{uuid.uuid4().hex}"
        deliveries.append(
            {
                "id": delivery_id,
                "appeal_id": appeal_id,
                "campaign": CAMPAIGN,
                "section": "us",
                "target": "ambassador-us",
                "channel": "email",
                "recipient": f"official-{k % recipients}@example.org",
                "language": "en",
                "state": State.PLANNED,
                "attempts": 0,
                "next_attempt_at": now - timedelta(seconds=letters - k),
                "message_id": f"<{delivery_id}@bench.example.org>",
                "created_at": now - timedelta(seconds=letters - k),
                "updated_at": now - timedelta(minutes=10),
            }
        )
    with service.ledger.engine.begin() as conn:
        for start in range(0, letters, 5000):
            conn.execute(insert(Appeal), appeals[start : start + 5000])
            conn.execute(insert(Delivery), deliveries[start : start + 5000])


def bare_query(service: Service, now: datetime) -> None:
    """The reconciler's release query before pacing (Ledger.due at commit 06d15b4), planned part."""
    d = Delivery
    with service.ledger.engine.connect() as conn:
        conn.execute(
            select(d.id)
            .where(
                and_(
                    d.state == State.PLANNED,
                    d.next_attempt_at <= now,
                    or_(d.attempts > 0, d.updated_at <= now - timedelta(seconds=5)),
                )
            )
            .order_by(d.next_attempt_at)
            .limit(1000)
        ).all()


def timed(fn: Callable[[], object], runs: int) -> float:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return statistics.median(out)


def measure(redis_url: str, letters: int, recipients: int, ticks: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            config_dir=ROOT / "config",
            templates_dir=ROOT / "templates",
            var_dir=Path(tmp),
            database_url=f"sqlite:///{tmp}/ledger.sqlite3",
            redis_url=redis_url,
            redis_namespace=f"pacer-{uuid.uuid4().hex[:8]}",
            demo_campaigns=True,
            office_hours=False,
        )
        now = datetime.now(UTC)
        service = Service(settings, clock=lambda: now)
        service.ledger.migrate()
        fill(service, letters, recipients, now)
        queue = CountingQueue()
        reconciler = service.reconciler(housekeeping_every=1e9)
        reconciler.enqueuer = cast(Enqueuer, queue)  # (counts what a tick would enqueue)
        reconciler.housekeeping(now)  # not part of a tick's release work
        bare = timed(lambda: bare_query(service, now), ticks)
        start = time.perf_counter()
        reconciler.tick()
        first = (time.perf_counter() - start) * 1000
        released_first = queue.sent
        steady = timed(reconciler.tick, ticks)
        forecast_ms = timed(
            lambda: campaign_forecast(ledger=service.ledger, pacer=service.pacer, campaign=CAMPAIGN, now=now), 3
        )
        service.ledger.dispose()
        return {
            "bare": bare,
            "first": first,
            "steady": steady,
            "forecast": forecast_ms,
            "released": released_first,
            "extra": queue.sent - released_first,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--letters", default="1000,10000,50000")
    parser.add_argument("--recipients", default="10,100")
    parser.add_argument("--ticks", type=int, default=20)
    args = parser.parse_args()
    table = Table(title="reconciler tick with pacing vs the bare pre-pacing query (ms, medians)")
    for col in (
        "letters",
        "recipients",
        "bare query",
        "first tick",
        "ratio",
        "steady tick",
        "ratio",
        "forecast",
        "released",
    ):
        table.add_column(col, justify="right")
    with RedisServer(appendonly=False) as redis_server:
        for letters in (int(x) for x in args.letters.split(",")):
            for recipients in (int(x) for x in args.recipients.split(",")):
                m = measure(redis_server.url, letters, recipients, args.ticks)
                table.add_row(
                    str(letters),
                    str(recipients),
                    f"{m['bare']:.1f}",
                    f"{m['first']:.0f}",
                    f"{m['first'] / m['bare']:.1f}×",
                    f"{m['steady']:.1f}",
                    f"{m['steady'] / m['bare']:.2f}×",
                    f"{m['forecast']:.0f}",
                    f"{m['released']:.0f} (+{m['extra']:.0f})",
                )
                console.print(f"{letters} letters / {recipients} recipients: {m}")
    console.print(table)


if __name__ == "__main__":
    main()
