"""A letter that bounces days later, end to end with real servers: the relay (aiosmtpd) accepts
the letter and then mails a real RFC 3464 DSN to the letter's VERP address, through the bounce
listener of ``dispatcher bounces``; the letter ends ``bounced`` with the DSN's status, the
address is suppressed, and the next appeal to that target goes by fax through the fax lab when
the route has ``fallback = ["fax"]`` — or fails with "address known to bounce" when it has none."""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from dispatcher.app import Service
from dispatcher.bounces import BounceReceiver
from dispatcher.sandbox.smtp import LoopbackController, SmtpServerThread
from tests.conftest import ROOT, Running, make_settings, wait_for
from tests.support.liveconfig import write_config
from tests.support.services import free_port

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

MINISTER = "minister@ministry.example"

_SECTION_TABLES = """
[smtp]
host = "127.0.0.1"

[bounces]
domain = "bounces.zz.dispatch.example"
"""


def dsn(verp: str, *, status: str = "5.1.1", action: str = "failed", original_id: str = "<x@y>") -> bytes:
    """A Postfix-style DSN (RFC 3464) for a letter to the minister, as a relay mails it."""
    now = format_datetime(datetime.now(UTC))
    text = f"""From: MAILER-DAEMON@relay.zz.dispatch.example (Mail Delivery System)
To: {verp}
Subject: Undelivered Mail Returned to Sender
Date: {now}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B0UND"

--B0UND
Content-Type: text/plain; charset=us-ascii

This is the mail system at host relay.zz.dispatch.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

--B0UND
Content-Type: message/delivery-status

Reporting-MTA: dns; relay.zz.dispatch.example
Arrival-Date: {now}

Final-Recipient: rfc822; {MINISTER}
Original-Recipient: rfc822;{MINISTER}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.ministry.example
Diagnostic-Code: smtp; 550 {status} <{MINISTER}>: Recipient address rejected: User unknown

--B0UND
Content-Type: text/rfc822-headers

Message-ID: {original_id}
To: {MINISTER}
Subject: An appeal

--B0UND--
"""
    return text.replace("\n", "\r\n").encode()


class _RelayHandler:
    def __init__(self, relay: BouncingRelay):
        self.relay = relay

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return self.relay.accept(envelope)


class BouncingRelay(SmtpServerThread):
    """Accepts every letter, then does what a relay does when the far side refuses it after
    acceptance: mails a DSN to the envelope sender, retrying while the listener answers 4xx."""

    what = "the bouncing relay"

    def __init__(self, bounce_port: int):
        super().__init__()
        self.bounce_port = bounce_port
        self.letters: list[Envelope] = []
        self.dsn_answers: list[str] = []

    def _controller(self) -> LoopbackController:
        return LoopbackController(_RelayHandler(self), hostname=self.host, port=0, server_hostname="relay.invalid")

    def accept(self, envelope: Envelope) -> str:
        self.letters.append(envelope)
        threading.Thread(target=self._bounce, args=(envelope,), daemon=True).start()
        return f"250 2.0.0 Ok: queued as RELAY{len(self.letters)}"

    def _bounce(self, envelope: Envelope) -> None:
        content = envelope.original_content or b""
        original_id = next(
            (
                line.split(b":", 1)[1].strip().decode()
                for line in content.splitlines()
                if line.lower().startswith(b"message-id:")
            ),
            "<none>",
        )
        for _ in range(100):
            try:
                with smtplib.SMTP("127.0.0.1", self.bounce_port, timeout=10) as smtp:
                    smtp.sendmail("", [envelope.mail_from], dsn(envelope.mail_from, original_id=original_id))
                self.dsn_answers.append("250")
                return
            except smtplib.SMTPResponseException as exc:
                self.dsn_answers.append(str(exc.smtp_code))
                time.sleep(0.1)


def bounce_service(
    tmp_path: Path,
    database_url: str,
    redis_server: object,
    *,
    fallback: bool,
    bounce_tables: str = "",
    environ: Mapping[str, str] | None = None,
) -> tuple[Service, int]:
    """A service whose section ``zz`` has a bounce domain (and ``bounce_tables`` after its
    ``[bounces]`` table, say ``[bounces.imap]``), with the listener's port to be."""
    config = write_config(
        tmp_path,
        campaign_id="TEST-BOUNCE",
        channel="email",
        address_line=f'email = "{MINISTER}"\nfax = "+44 20 7946 0100"',
        relay_and_gateway=_SECTION_TABLES + bounce_tables,
    )
    if fallback:
        section = config / "sections" / "zz.toml"
        section.write_text(section.read_text() + 'fallback = ["fax"]\n')
    bounce_port = free_port()
    settings = make_settings(
        tmp_path,
        database_url=database_url,
        redis_url=redis_server.url,
        smtp_port=free_port(),  # type: ignore[attr-defined]
    ).but(
        demo_campaigns=False,
        config_dir=config,
        templates_dir=ROOT / "templates",
        bounces_port=bounce_port,
        # two faxes to the same number take turns on its line: a turn need not wait a minute here
        fax_line_wait_seconds=1.0,
    )
    service = Service(settings, environ={"DISPATCH_INTAKE_KEY_ZZ": "k", **(environ or {})})
    service.ledger.migrate()
    return service, bounce_port


def submit(service: Service, n: int) -> dict[str, str]:
    accepted = service.intake.submit(
        {
            "campaign": "TEST-BOUNCE",
            "section": "zz",
            "language": "en",
            "supporter": {"name": f"Jane Doe {n}", "email": f"jane{n}@example.org", "country": "GB"},
        }
    )
    return {d.channel: d.id for d in accepted.deliveries}


def letters_of(service: Service, appeal_email_id: str) -> list[tuple[str, str]]:
    view = service.ledger.views.delivery(appeal_email_id)
    assert view is not None and view.appeal_id is not None
    appeal = service.ledger.views.appeal(view.appeal_id)
    assert appeal is not None
    return sorted((d.channel, d.state.value) for d in appeal.deliveries)


@pytest.mark.parametrize("fallback", [True, False], ids=["fallback-fax", "no-fallback"])
def test_a_bounce_mailed_back_later_bounces_the_letter_and_reroutes_the_next(
    tmp_path: Path, database_url: str, redis_server: object, fallback: bool
) -> None:
    service, bounce_port = bounce_service(tmp_path, database_url, redis_server, fallback=fallback)
    with BouncingRelay(bounce_port) as relay:
        service.settings = service.settings.but(sandbox_smtp_port=relay.port)
        receiver = BounceReceiver(service)
        receiver.start()
        try:
            with Running(service):
                first = submit(service, 1)["email"]
                wait_for(lambda: service.ledger.views.state_of(first) == "bounced", timeout=30)
                view = service.ledger.views.delivery(first)
                assert view is not None
                assert view.last_code == "5.1.1" and "User unknown" in (view.last_text or "")
                # the letter left with a VERP envelope sender on the section's bounce domain
                [letter] = relay.letters
                assert letter.mail_from.startswith("bounces+") and letter.mail_from.endswith(
                    "@bounces.zz.dispatch.example"
                )
                assert first not in letter.mail_from  # the id is encoded, under a MAC
                # the address is suppressed just after the bounce is recorded (its own transaction)
                wait_for(lambda: service.ledger.suppressions.find("email", MINISTER) is not None, timeout=10)
                suppressed = service.ledger.suppressions.find("email", MINISTER)
                assert suppressed is not None and suppressed.delivery == first
                [fact] = service.ledger.bounces.of(first)
                assert (fact.kind, fact.status, fact.reporting_mta) == ("hard", "5.1.1", "relay.zz.dispatch.example")

                # workers re-read the suppression list at most once a second (a letter sent in
                # that second would bounce and be rerouted the same way, one step later)
                time.sleep(1.1)
                second = submit(service, 2)["email"]
                if fallback:
                    wait_for(lambda: ("fax", "delivered") in letters_of(service, second), timeout=60)
                    assert letters_of(service, second) == [("email", "rerouted"), ("fax", "delivered")]
                    # the bounced letter was planned again by fax too: one letter per target
                    wait_for(
                        lambda: letters_of(service, first) == [("email", "bounced"), ("fax", "delivered")], timeout=60
                    )
                    replacement = [
                        d for d in service.ledger.views.appeal(view.appeal_id).deliveries if d.channel == "fax"
                    ]  # type: ignore[arg-type,union-attr]
                    assert replacement[0].replaces == first
                else:
                    wait_for(lambda: service.ledger.views.state_of(second) == "failed", timeout=30)
                    failed = service.ledger.views.delivery(second)
                    assert failed is not None and "address known to bounce" in (failed.last_text or "")
                    assert letters_of(service, second) == [("email", "failed")]
                # nothing more went by email: the address is known to bounce
                assert len(relay.letters) == 1
        finally:
            receiver.stop()


@SQLITE
@pytest.mark.parametrize("fallback", [True, False], ids=["fallback-fax", "no-fallback"])
def test_the_forecast_shows_letters_that_will_go_by_fallback(
    tmp_path: Path, database_url: str, redis_server: object, fallback: bool
) -> None:
    from dispatcher.ledger.models import utcnow
    from dispatcher.queue.fallback import Fallback
    from dispatcher.queue.forecast import campaign_forecast

    service, _ = bounce_service(tmp_path, database_url, redis_server, fallback=fallback)
    service.intake.enqueuer = None  # no worker: the letters wait
    for n in range(3):
        submit(service, n)
    service.ledger.suppressions.add(
        "email", MINISTER, reason="bounced", code="5.1.1", text="User unknown", now=utcnow()
    )
    rows = campaign_forecast(
        ledger=service.ledger,
        pacer=service.pacer,
        campaign="TEST-BOUNCE",
        now=utcnow(),
        fallback=Fallback(catalog=service.catalog, channels=service.channels, ledger=service.ledger),
    )
    [row] = rows
    assert row.forecast.recipient == f"email:{MINISTER}"
    assert row.fallback is not None and "address known to bounce" in row.fallback.reason
    if fallback:
        assert (row.fallback.rerouted, row.fallback.failing) == ({"fax": 3}, 0)
    else:
        assert (row.fallback.rerouted, row.fallback.failing) == ({}, 3)
