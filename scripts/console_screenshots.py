"""Screenshots of the operators' console for docs/console.md.

Runs the whole service on a throw-away ledger in a temporary directory (sandbox mode, a private
redis-server, the sandbox SMTP server, a worker and the reconciler in this process), fills it with
sample appeals — supporters at example.org, nothing leaves the machine — signs in with headless
Debian chromium through Playwright and saves one PNG per page into docs/console/:

    .venv/bin/python scripts/console_screenshots.py [--out docs/console]

The sample: section us's email letters sent to the sandbox SMTP server; the fax channels of us and
ch paused by an operator (so their letters wait and the campaign page has a pacing forecast with
the default fax caps); one email letter that failed after its tries ran out, one cancelled by an
operator. The erasure page is shown at its preview step for one sample supporter, who is not
erased. Nothing here reads DATABASE_URL, REDIS_URL or DISPATCH_MODE: it never touches a real
ledger or queue.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatcher.app import Service  # noqa: E402
from dispatcher.config.loader import load_catalog  # noqa: E402
from dispatcher.dev import _free_port, _start_private_redis  # noqa: E402
from dispatcher.ledger.lifecycle import Result  # noqa: E402
from dispatcher.ledger.states import Event, State  # noqa: E402
from dispatcher.sandbox.smtp import SandboxSMTP  # noqa: E402
from dispatcher.settings import Settings  # noqa: E402
from tests.support.console import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

CAMPAIGN = "UA-002-19-DEMO"
ADMIN, PASSWORD = "ada", secrets.token_urlsafe(12)
SUPPORTERS = [
    ("Jane Doe", "Boston", "US"),
    ("Alex Rivera", "Austin", "US"),
    ("Sam Okafor", "Chicago", "US"),
    ("Mia Chen", "Seattle", "US"),
    ("Noah Smith", "Denver", "US"),
    ("Lena Park", "Portland", "US"),
]
CH_SUPPORTERS = [("Anna Muster", "Bern", "CH"), ("Luca Rossi", "Lugano", "CH"), ("Claire Dubois", "Genève", "CH")]


def now() -> datetime:
    return datetime.now(UTC)


def appeal(section: str, name: str, city: str, country: str, n: int) -> dict[str, object]:
    first = name.split()[0].lower()
    return {
        "campaign": CAMPAIGN,
        "section": section,
        "language": "de" if section == "ch" else "en",
        "supporter": {"name": name, "email": f"{first}.{n}@example.org", "city": city, "country": country},
        "message": "Please release him now." if section == "us" else None,
        "client_ref": f"sample-{section}-{n}",
    }


def wait_for(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("the sample letters were not sent in time")
        time.sleep(0.1)


def build(stack: ExitStack, tmp: Path) -> Service:
    var = tmp / "var"
    var.mkdir()
    base = Settings(
        config_dir=ROOT / "config",
        templates_dir=ROOT / "templates",
        var_dir=var,
        database_url=f"sqlite:///{tmp / 'ledger.sqlite3'}",
        redis_url="redis://127.0.0.1:1/0",
        redis_namespace=f"screens-{secrets.token_hex(4)}",
        mode="sandbox",
        demo_campaigns=True,
        office_hours=False,
        email_limits=(),
    )
    settings = base.but(redis_url=_start_private_redis(base, stack))
    smtp = SandboxSMTP(settings.sandbox_mail_dir, host="127.0.0.1", port=0)
    smtp.start()
    stack.callback(smtp.stop)
    settings = settings.but(sandbox_smtp_port=smtp.port)
    catalog = load_catalog(settings.config_dir, settings.templates_dir)
    environ = {s.intake_key_env: secrets.token_hex(16) for s in catalog.sections.values()}
    service = Service(settings, environ=environ)
    service.ledger.migrate()
    return service


def fill(service: Service, stack: ExitStack) -> dict[str, str]:
    """The sample letters; returns the ids the screenshots open."""
    ledger = service.ledger
    ledger.operators.add(ADMIN, PASSWORD, role="admin", now=now(), actor="cli:screenshots")
    ledger.operators.add("olga", secrets.token_urlsafe(12), role="operator", sections=("us",), now=now(), actor=ADMIN)
    for key, by in (("fax:us", "olga"), ("fax:ch", ADMIN)):
        ledger.controls.pause_channel(key, "gateway account being renewed", now(), by=by)

    # before any worker runs: a letter whose tries ran out, and one an operator cancelled
    enqueuer, service.intake.enqueuer = service.intake.enqueuer, None
    failed = service.intake.submit(appeal("us", "Kim Lee", "Miami", "US", 90))
    failed_id = next(d.id for d in failed.deliveries if d.channel == "email")
    for attempt in range(1, 4):
        claim = ledger.lifecycle.claim(failed_id, "host:4242:ab12cd", now())
        assert claim is not None
        last = attempt == 3
        ledger.lifecycle.finish(
            claim,
            Result(
                Event.FAILED if last else Event.RETRY,
                "transient",
                code="451",
                text=("gave up after transient failures (limit: 3 tries): " if last else "")
                + "4.7.1 Greylisted, please try again later",
                next_attempt_at=None if last else now(),
            ),
            worker="host:4242:ab12cd",
            started_at=now(),
            now=now(),
        )
    cancelled = service.intake.submit(appeal("us", "Tom Baker", "Reno", "US", 91))
    cancelled_id = next(d.id for d in cancelled.deliveries if d.channel == "email")
    ledger.actions.cancel(cancelled_id, actor="olga", reason="the supporter asked to withdraw", now=now())
    service.intake.enqueuer = enqueuer

    # a worker and the reconciler, running until the screenshots are taken (the overview shows them)
    handle = service.worker(threads=2)
    handle.start()
    stop = threading.Event()
    reconciler = threading.Thread(target=service.reconciler(interval=0.2).run, args=(stop,), daemon=True)
    reconciler.start()
    stack.callback(lambda: handle.stop(timeout_ms=10_000))
    stack.callback(reconciler.join, 5)
    stack.callback(stop.set)
    sent = []
    for n, (name, city, country) in enumerate(SUPPORTERS):
        accepted = service.intake.submit(appeal("us", name, city, country, n))
        sent += [d.id for d in accepted.deliveries if d.channel == "email"]
    fax_id = ""
    for n, (name, city, country) in enumerate(CH_SUPPORTERS):
        accepted = service.intake.submit(appeal("ch", name, city, country, n))
        fax_id = fax_id or accepted.deliveries[0].id
    wait_for(lambda: all(ledger.views.state_of(i) == State.SENT for i in sent))
    return {"failed": failed_id, "sent": sent[0], "fax": fax_id}


def shoot(url: str, out: Path, letters: dict[str, str]) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    saved = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})

        def save(name: str, path: str | None = None) -> None:
            if path is not None:
                page.goto(url + path)
            page.wait_for_load_state("networkidle")
            target = out / f"{name}.png"
            # A window as tall as the page rather than full_page=True, which leaves frames blank
            # (the letter's HTML is in one).
            height = page.evaluate("document.documentElement.scrollHeight")
            page.set_viewport_size({"width": 1280, "height": max(860, height)})
            page.screenshot(path=str(target))
            page.set_viewport_size({"width": 1280, "height": 860})
            saved.append(target)

        page.goto(url + "/console/login")
        save("login")
        page.fill("input[name=name]", ADMIN)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(url + "/console/")
        save("overview")
        save("campaigns", "/console/campaigns")
        save("campaign", f"/console/campaigns/{CAMPAIGN}")
        save("letters", "/console/letters")
        save("letter", f"/console/letters/{letters['failed']}")
        save("letter-email", f"/console/letters/{letters['sent']}")
        save("letter-fax", f"/console/letters/{letters['fax']}")
        save("channels", "/console/channels")
        save("audit", "/console/audit")
        # the erasure's preview step (the form posted, nothing erased: no confirmation is typed)
        page.goto(url + "/console/supporters/erase")
        page.fill("main input[name=email]", "mia.3@example.org")
        page.fill("main input[name=reason]", "request #41 by email")
        page.click("main button[type=submit]")
        page.wait_for_selector("form.confirm")
        save("erase")
        browser.close()
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console")
    args = parser.parse_args(argv)
    import uvicorn

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        service = build(stack, Path(tmp))
        letters = fill(service, stack)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(service.api(), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started, timeout=15)
        try:
            saved = shoot(f"http://127.0.0.1:{port}", args.out, letters)
        finally:
            server.should_exit = True
            thread.join(10)
            service.ledger.dispose()
    for path in saved:
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
