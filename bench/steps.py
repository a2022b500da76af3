"""What one letter costs, step by step, in one thread with nothing else running.

Complements bench/throughput.py (the whole pipeline under load) and its py-spy profile: the same
steps the worker takes for one delivery (DeliveryProcessor: claim, supporter, render,
build_message, replace_header, flatten for SMTP, finish), each timed on its own over the
letters of ``--appeals`` appeals, in microseconds per letter (median of ``--repeat`` passes).
The ledger steps run on a fresh SQLite file (or a fresh PostgreSQL database with
``--database-url``), uncontended. Two last rows time ``build_message`` on one letter as shipped
and with header classes cached (an experiment, patched into this process only).

    .venv/bin/python bench/steps.py [--appeals 200] [--repeat 3] [--database-url URL]
"""

from __future__ import annotations

import argparse
import email.headerregistry
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiosmtplib.email import flatten_message  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.throughput import (  # noqa: E402
    CAMPAIGN,
    CONFIG_DIR,
    KEY_ENV,
    SECTION,
    TEMPLATES_DIR,
    appeal_payload,
    fresh_database,
)
from dispatcher.channels.email.message import build_message  # noqa: E402
from dispatcher.config.loader import load_catalog  # noqa: E402
from dispatcher.intake.service import IntakeService  # noqa: E402
from dispatcher.ledger.lifecycle import Result  # noqa: E402
from dispatcher.ledger.states import Event  # noqa: E402
from dispatcher.ledger.store import Ledger  # noqa: E402
from dispatcher.logging import configure as configure_logging  # noqa: E402
from dispatcher.render.letters import LetterRequest, Renderer, Supporter  # noqa: E402
from dispatcher.settings import Settings  # noqa: E402


def timed(results: dict[str, list[float]], name: str, fn: Callable[[], Any], n: int) -> Any:
    started = time.perf_counter()
    out = fn()
    results.setdefault(name, []).append((time.perf_counter() - started) * 1e6 / n)
    return out


def one_pass(args: argparse.Namespace, workdir: Path, results: dict[str, list[float]], run: int) -> None:
    catalog = load_catalog(CONFIG_DIR, TEMPLATES_DIR)
    renderer = Renderer(TEMPLATES_DIR)
    campaign, section = catalog.campaign(CAMPAIGN), catalog.section(SECTION)
    with fresh_database(args.database_url, workdir, f"steps-{run}") as url:
        settings = Settings(
            config_dir=CONFIG_DIR,
            templates_dir=TEMPLATES_DIR,
            var_dir=workdir,
            database_url=url,
            redis_url="redis://127.0.0.1:1/0",  # never used: no enqueuer
        )
        ledger = Ledger(url)
        ledger.migrate()
        intake = IntakeService(
            settings=settings,
            catalog=catalog,
            ledger=ledger,
            enqueuer=None,
            choose_language=renderer.choose_language,
            environ={KEY_ENV: "x"},
        )
        payloads = [appeal_payload(i, f"steps{run}") for i in range(args.appeals)]
        accepted = timed(
            results,
            "intake.submit (per appeal, no enqueue)",
            lambda: [intake.submit(p) for p in payloads],
            len(payloads),
        )
        ids = [d.id for a in accepted for d in a.deliveries]
        worker = "bench:1"
        steps: dict[str, float] = {}

        def step(name: str, started: float) -> float:
            now = time.perf_counter()
            steps[name] = steps.get(name, 0.0) + now - started
            return now

        # One letter at a time, as a worker thread does, so nothing piles up for the garbage collector.
        for delivery_id in ids:
            t = time.perf_counter()
            now = datetime.now(UTC)
            claim = ledger.lifecycle.claim(delivery_id, worker, now)
            assert claim is not None
            t = step("ledger.lifecycle.claim (UPDATE + SELECT)", t)
            assert claim.appeal_id is not None  # (a letter, not a digest)
            person = ledger.views.supporter(claim.appeal_id)
            assert person is not None
            t = step("ledger.views.supporter (SELECT)", t)
            target = catalog.target(claim.campaign, claim.section, claim.target)
            rendered = renderer.render_email(
                LetterRequest(
                    campaign=campaign,
                    section=section,
                    target=target,
                    language=claim.language,
                    supporter=Supporter(person.name, person.email, person.city, person.country),
                    message=person.message,
                    date=now.date(),
                )
            )
            t = step("render_email (Jinja2)", t)
            message = build_message(
                delivery_id=claim.id,
                section=section,
                to_name=target.name,
                to_address=claim.recipient,
                supporter_name=person.name,
                supporter_email=person.email,
                subject=rendered.subject,
                text=rendered.text,
                html=rendered.html,
                language=rendered.language,
                date=datetime.now(UTC),
            )
            t = step("build_message (email package)", t)
            message.replace_header("Message-ID", claim.message_id)
            t = step("message.replace_header('Message-ID')", t)
            flatten_message(message)
            t = step("flatten_message (DATA bytes, in pool.send)", t)
            ledger.lifecycle.finish(
                claim, Result(Event.SENT, "sent", code=250), worker=worker, started_at=now, now=datetime.now(UTC)
            )
            step("ledger.lifecycle.finish (INSERT + UPDATE)", t)
        for name, seconds in steps.items():
            results.setdefault(name, []).append(seconds * 1e6 / len(ids))
        ledger.dispose()


class CachingHeaderRegistry(email.headerregistry.HeaderRegistry):
    """The stdlib registry builds a new class with type() for every header object it makes;
    this one builds it once per header name. For the experiment below only."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


def header_class_experiment(letters: int) -> dict[str, float]:
    """build_message, µs per letter: as shipped, and with the message policy given a registry
    that caches header classes (patched into the module in this process only)."""
    import dispatcher.channels.email.message as message_module

    catalog = load_catalog(CONFIG_DIR, TEMPLATES_DIR)
    renderer = Renderer(TEMPLATES_DIR)
    campaign, section = catalog.campaign(CAMPAIGN), catalog.section(SECTION)
    target = campaign.targets["official-1"]
    now = datetime.now(UTC)
    person = appeal_payload(1, "exp")["supporter"]
    rendered = renderer.render_email(
        LetterRequest(
            campaign=campaign,
            section=section,
            target=target,
            language="en",
            supporter=Supporter(person["name"], person["email"], person["city"], person["country"]),
            message=appeal_payload(1, "exp")["message"],
            date=now.date(),
        )
    )

    def build_all() -> float:
        started = time.perf_counter()
        for i in range(letters):
            message_module.build_message(
                delivery_id=f"dl_{i:032x}",
                section=section,
                to_name=target.name,
                to_address=str(target.email),
                supporter_name=person["name"],
                supporter_email=person["email"],
                subject=rendered.subject,
                text=rendered.text,
                html=rendered.html,
                language=rendered.language,
                date=now,
            )
        return (time.perf_counter() - started) * 1e6 / letters

    shipped = message_module.MESSAGE_POLICY
    out = {"build_message, as shipped": statistics.median(build_all() for _ in range(5))}
    message_module.MESSAGE_POLICY = shipped.clone(header_factory=CachingHeaderRegistry())
    try:
        out["build_message, header classes cached (experiment)"] = statistics.median(build_all() for _ in range(5))
    finally:
        message_module.MESSAGE_POLICY = shipped
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--appeals", type=int, default=200, help="appeals per pass (5 letters each)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", default=None, help="PostgreSQL server (default: SQLite in a temp dir)")
    args = parser.parse_args()
    configure_logging("WARNING")
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="dispatch-steps-") as tmp:
        for run in range(args.repeat):
            one_pass(args, Path(tmp), results, run)
    table = Table(
        title=f"one letter, step by step — µs per letter, median of {args.repeat} "
        f"({'PostgreSQL' if args.database_url else 'SQLite'}, "
        "uncontended, one thread)",
        title_justify="left",
    )
    table.add_column("step")
    table.add_column("µs / letter", justify="right")
    total = 0.0
    for name, values in results.items():
        med = statistics.median(values)
        if "per appeal" not in name:
            total += med
        table.add_row(name, f"{med:,.0f}")
    table.add_row("[bold]sum of the per-letter steps[/bold]", f"[bold]{total:,.0f}[/bold]")
    for name, micros in header_class_experiment(400).items():
        table.add_row(f"[dim]{name}, one letter over and over[/dim]", f"[dim]{micros:,.0f}[/dim]")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
