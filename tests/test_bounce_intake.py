"""What ``dispatcher bounces`` does with each kind of message that comes back, through its real
servers: the SMTP listener (mail sent with smtplib to the bounce domain's MX) and the IMAP poller
(a real dovecot). Every letter here was really sent first, through a relay stand-in that accepts
it and bounces nothing by itself; the bounce is then mailed by the test, made from the fixtures
of tests/fixtures/bounces/ with the letter's own VERP token.

* a hard DSN: the letter ends ``bounced``, its address is suppressed, the facts are kept;
* a soft one (mailbox full): the letter waits for another try and nothing is suppressed, but
  ``soft_bounce_limit`` of them for one address within the window count as hard, and the same
  bounce mailed twice counts once;
* an auto-reply or a delay warning: kept as a fact, the letter stays ``sent``;
* anything without a valid token, about an unknown letter, or unreadable: ``250``, logged,
  counted and dropped, the letter unchanged; mail for another domain gets ``550``;
* a bounce that overtakes the send's own answer (its letter still ``sending``): ``451``, so the
  sending MTA keeps it and tries again.
"""

from __future__ import annotations

import smtplib
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dispatcher.app import Service
from dispatcher.bounces import BounceReceiver
from dispatcher.channels.email.channel import EmailChannel
from dispatcher.ledger.models import utcnow
from tests.conftest import Running, wait_for
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpTestServer
from tests.test_bounces_e2e import MINISTER, SQLITE, bounce_service, dsn, submit

FIXTURES = Path(__file__).parent / "fixtures" / "bounces"
#: the domain and letter the fixtures were written for, replaced by ours
FIXTURE_DOMAIN = b"bounces.ch.dispatch.example"
DOMAIN = "bounces.zz.dispatch.example"


@dataclass
class Intake:
    """A service whose letters go to a relay that accepts them, and its ``dispatcher bounces``."""

    service: Service
    relay: SmtpTestServer
    receiver: BounceReceiver
    appeals: int = field(default=0)

    @property
    def channel(self) -> EmailChannel:
        channel = self.receiver.intake.channel
        assert isinstance(channel, EmailChannel)
        return channel

    def send_letters(self, n: int = 1) -> list[str]:
        """Submit ``n`` appeals and run the worker until their letters are ``sent``; then stop it,
        so what a bounce does to a letter stays in the ledger to be seen."""
        letters = []
        with Running(self.service):
            for _ in range(n):
                self.appeals += 1
                letters.append(submit(self.service, self.appeals)["email"])
            wait_for(lambda: all(self.state(letter) == "sent" for letter in letters), timeout=30)
        return letters

    def state(self, letter: str) -> str | None:
        return self.service.ledger.views.state_of(letter)

    def return_path(self, letter: str) -> str:
        """The letter's VERP address, as its envelope sender reached the relay."""
        address = self.channel.envelope_sender(self.service.catalog.sections["zz"], letter)
        assert address in [m.mail_from for m in self.relay.messages]
        return address

    def bounce_for(self, letter: str, fixture: str) -> bytes:
        """``fixture`` as it would come back for ``letter``: its token, our bounce domain."""
        return made(fixture, token_of(self.return_path(letter)))

    def mail(self, raw: bytes, rcpt: str) -> tuple[int, int]:
        """Mail ``raw`` to the listener as a relay's bounce (null sender): the RCPT and DATA
        reply codes (DATA 0 when RCPT was refused)."""
        with smtplib.SMTP("127.0.0.1", self.receiver.listener.port, timeout=30) as smtp:
            smtp.ehlo("relay.zz.dispatch.example")
            smtp.mail("")
            rcpt_code, _ = smtp.rcpt(rcpt)
            if rcpt_code >= 400:
                return rcpt_code, 0
            data_code, _ = smtp.data(raw)
            return rcpt_code, data_code

    def bounce(self, letter: str, fixture: str) -> int:
        """Mail ``fixture``, made for ``letter``, to the letter's return path; the DATA reply."""
        return self.bounce_raw(letter, self.bounce_for(letter, fixture))

    def bounce_raw(self, letter: str, raw: bytes) -> int:
        rcpt_code, data_code = self.mail(raw, self.return_path(letter))
        assert rcpt_code == 250
        return data_code


@pytest.fixture
def intake(tmp_path: Path, database_url: str, redis_server: object) -> Iterator[Intake]:
    with running_intake(tmp_path, database_url, redis_server) as started:
        yield started


@contextmanager
def running_intake(
    tmp_path: Path,
    database_url: str,
    redis_server: object,
    *,
    bounce_tables: str = "",
    environ: dict[str, str] | None = None,
) -> Iterator[Intake]:
    service, _ = bounce_service(
        tmp_path, database_url, redis_server, fallback=False, bounce_tables=bounce_tables, environ=environ
    )
    with SmtpTestServer() as relay:
        service.settings = service.settings.but(sandbox_smtp_port=relay.port)
        receiver = BounceReceiver(service)
        receiver.start()
        try:
            yield Intake(service, relay, receiver)
        finally:
            receiver.stop()
            service.ledger.dispose()


def token_of(return_path: str) -> str:
    return return_path.partition("+")[2].partition("@")[0]


def made(fixture: str, token: str) -> bytes:
    """``fixture`` with ``token`` and our bounce domain, in CRLF lines as SMTP carries them."""
    raw = (FIXTURES / fixture).read_bytes().replace(b"{{VERP}}", token.encode())
    return raw.replace(FIXTURE_DOMAIN, DOMAIN.encode()).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def kinds(intake: Intake, letter: str) -> list[str]:
    return sorted(f.kind for f in intake.service.ledger.bounces.of(letter))


# ---------------------------------------------------------------------------------- hard


@SQLITE
@pytest.mark.parametrize("fixture", ["postfix_hard.eml", "exim_hard.eml", "qmail_plain.eml"])
def test_a_hard_bounce_bounces_the_letter_and_suppresses_its_address(intake: Intake, fixture: str) -> None:
    [letter] = intake.send_letters()

    assert intake.bounce(letter, fixture) == 250

    assert intake.state(letter) == "bounced"
    [fact] = intake.service.ledger.bounces.of(letter)
    assert fact.kind == "hard"
    view = intake.service.ledger.views.delivery(letter)
    assert view is not None and view.last_code == fact.status and "bounced" in (view.last_text or "")
    suppressed = intake.service.ledger.suppressions.find("email", MINISTER)
    if fixture == "qmail_plain.eml":
        # qmail's plain text names no status: the letter bounced, but nothing says the address is dead
        assert suppressed is None
    else:
        assert suppressed is not None and suppressed.delivery == letter and suppressed.code == fact.status
    assert intake.receiver.intake.counts["applied"] == 1


@SQLITE
def test_a_ten_megabyte_bounce_is_read_from_its_head(intake: Intake) -> None:
    [letter] = intake.send_letters()
    # the DSN comes first, then the returned letter with a 10 MB attachment the relay quoted whole
    head = dsn(intake.return_path(letter), status="5.1.1").rsplit(b"--B0UND--", 1)[0]
    filler = (b"QUJD" * 19 + b"\r\n") * (10 * 1024 * 1024 // 78)
    raw = head + b"--B0UND\r\nContent-Type: application/octet-stream\r\n\r\n" + filler + b"\r\n--B0UND--\r\n"
    assert len(raw) > 10 * 1024 * 1024
    seen: list[tuple[int, bool]] = []
    handle = intake.receiver.intake.handle

    def spy(raw: bytes, *, envelope_recipients: Sequence[str] = (), truncated: bool = False) -> object:
        seen.append((len(raw), truncated))
        return handle(raw, envelope_recipients=envelope_recipients, truncated=truncated)

    intake.receiver.intake.handle = spy  # type: ignore[method-assign]
    rcpt, data = intake.mail(raw, intake.return_path(letter))

    assert (rcpt, data) == (250, 250)
    # only the first MiB reached the reader, marked as cut; the DSN's facts were in it
    assert seen == [(1024 * 1024, True)]
    assert intake.state(letter) == "bounced"
    assert intake.service.ledger.suppressions.find("email", MINISTER) is not None


# ---------------------------------------------------------------------------------- soft


@SQLITE
@pytest.mark.parametrize("fixture", ["mailbox_full_422.eml", "mailbox_full_522.eml"])
def test_a_soft_bounce_sends_the_letter_again_later(intake: Intake, fixture: str) -> None:
    [letter] = intake.send_letters()
    before = utcnow()

    assert intake.bounce(letter, fixture) == 250

    view = intake.service.ledger.views.delivery(letter)
    assert view is not None
    assert view.state.value == "planned" and view.last_outcome == "transient"
    assert view.next_attempt_at is not None and view.next_attempt_at > before
    assert view.last_code in ("4.2.2", "5.2.2")
    assert kinds(intake, letter) == ["soft"]
    assert intake.service.ledger.suppressions.find("email", MINISTER) is None


@SQLITE
def test_three_soft_bounces_for_one_address_count_as_hard(intake: Intake) -> None:
    # three supporters' letters to the same minister, each back with "mailbox full"
    first, second, third = intake.send_letters(3)
    assert intake.service.settings.soft_bounce_limit == 3

    for letter in (first, second):
        assert intake.bounce(letter, "mailbox_full_522.eml") == 250
        assert intake.state(letter) == "planned"
        assert intake.service.ledger.suppressions.find("email", MINISTER) is None

    assert intake.bounce(third, "mailbox_full_422.eml") == 250

    assert intake.state(third) == "bounced"
    view = intake.service.ledger.views.delivery(third)
    assert view is not None and "3 soft bounces within 7 days, counted as hard" in (view.last_text or "")
    suppressed = intake.service.ledger.suppressions.find("email", MINISTER)
    assert suppressed is not None and suppressed.delivery == third
    assert [kinds(intake, letter) for letter in (first, second, third)] == [["soft"]] * 3


@SQLITE
def test_the_same_soft_bounce_mailed_again_is_one_soft_bounce(intake: Intake) -> None:
    # A relay that did not hear our 250 sends the bounce again, and an IMAP poller hands a
    # message over at least once: three copies of one "mailbox full" are one soft bounce, not
    # the three that would suppress the minister's address for every campaign.
    first, second = intake.send_letters(2)
    raw = intake.bounce_for(first, "mailbox_full_522.eml")
    for _ in range(3):
        assert intake.bounce_raw(first, raw) == 250
    assert intake.state(first) == "planned"
    assert kinds(intake, first) == ["soft"]
    assert intake.receiver.intake.counts["duplicate"] == 2

    # another supporter's letter to the minister comes back full too: the second soft bounce
    assert intake.bounce(second, "mailbox_full_422.eml") == 250

    assert intake.state(second) == "planned"
    assert intake.service.ledger.suppressions.find("email", MINISTER) is None


# ----------------------------------------------------------------------- recorded only


@SQLITE
def test_an_auto_reply_and_a_delay_warning_are_kept_and_move_nothing(intake: Intake) -> None:
    [letter] = intake.send_letters()

    assert intake.bounce(letter, "auto_reply.eml") == 250
    assert intake.bounce(letter, "delayed.eml") == 250

    assert intake.state(letter) == "sent"
    assert kinds(intake, letter) == ["auto_reply", "delayed"]
    [delayed] = [f for f in intake.service.ledger.bounces.of(letter) if f.kind == "delayed"]
    assert delayed.status == "4.4.1"
    assert intake.service.ledger.suppressions.find("email", MINISTER) is None
    counts = intake.receiver.intake.counts
    assert (counts["auto_reply"], counts["delayed"], counts["applied"]) == (1, 1, 0)


# ---------------------------------------------------------------------------- bad input


@SQLITE
def test_bad_input_is_answered_250_logged_counted_and_dropped(intake: Intake) -> None:
    [letter] = intake.send_letters()
    return_path = intake.return_path(letter)
    before = intake.service.ledger.views.delivery(letter)
    # a token the service really makes, for a letter it never had
    stranger = f"dl_{uuid.uuid4().hex}"
    unknown = intake.channel.envelope_sender(intake.service.catalog.sections["zz"], stranger)

    cases = [
        # (what, raw, envelope recipient, the counter it lands in); a plain bounces@ without a
        # token is "not_ours" to the VERP reader, as mail to postmaster@ would be
        ("no token", intake.bounce_for(letter, "no_token.eml"), f"bounces@{DOMAIN}", "dropped:not_ours"),
        (
            "forged token",
            intake.bounce_for(letter, "forged_token.eml"),
            f"bounces+mrwaci2fm6e2xtppaerukz4jvpg66tdieb5ah4c5h4@{DOMAIN}",
            "dropped:forged",
        ),
        (
            "unknown letter",
            made("postfix_hard.eml", token_of(unknown)),
            unknown,
            "dropped:unknown_letter",
        ),
        ("malformed MIME", intake.bounce_for(letter, "malformed_boundary.eml"), return_path, "dropped:unreadable"),
    ]
    with capture_logs() as logs:
        for what, raw, rcpt, _ in cases:
            assert intake.mail(raw, rcpt) == (250, 250), what
    counts = intake.receiver.intake.counts
    assert {counter: counts[counter] for *_, counter in cases} == {counter: 1 for *_, counter in cases}
    dropped = [e for e in logs if e["event"] == "email.bounce_dropped"]
    assert [e["why"] for e in dropped] == ["not_ours", "forged", "unknown_letter", "unreadable"]
    assert all(e["log_level"] == "warning" for e in dropped)
    assert dropped[2]["delivery"] == stranger

    after = intake.service.ledger.views.delivery(letter)
    assert after == before
    assert intake.service.ledger.bounces.of(letter) == []
    assert intake.service.ledger.suppressions.find("email", MINISTER) is None


@SQLITE
def test_mail_for_another_domain_is_refused_at_rcpt(intake: Intake) -> None:
    [letter] = intake.send_letters()
    raw = intake.bounce_for(letter, "postfix_hard.eml")
    local = intake.return_path(letter).partition("@")[0]

    assert intake.mail(raw, f"{local}@zz.dispatch.example") == (550, 0)
    assert intake.mail(raw, "postmaster@example.org") == (550, 0)

    assert intake.state(letter) == "sent"
    assert sum(intake.receiver.intake.counts.values()) == 0


# ------------------------------------------------------------------------- too early


@SQLITE
def test_a_bounce_for_a_letter_still_being_sent_is_deferred_with_451(intake: Intake) -> None:
    service = intake.service
    appeal = submit(service, 1)["email"]  # no worker runs: the letter waits
    claim = service.ledger.lifecycle.claim(appeal, "worker-under-test", utcnow() + timedelta(hours=1))
    assert claim is not None and intake.state(appeal) == "sending"
    # the relay already took it, and the far side already refused it
    return_path = intake.channel.envelope_sender(service.catalog.sections["zz"], appeal)
    raw = made("postfix_hard.eml", token_of(return_path))

    assert intake.mail(raw, return_path) == (250, 451)

    assert intake.state(appeal) == "sending"
    assert service.ledger.bounces.of(appeal) == []
    assert intake.receiver.intake.counts["later"] == 1


# ---------------------------------------------------------------------------------- IMAP


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    with DovecotServer() as server:
        yield server


@SQLITE
def test_a_bounce_in_the_sections_mailbox_is_polled_applied_and_removed(
    tmp_path: Path, database_url: str, redis_server: object, dovecot: DovecotServer
) -> None:
    imap_table = f"""
[bounces.imap]
host = "{dovecot.host}"
port = {dovecot.port}
tls = "none"
username_env = "DISPATCH_BOUNCES_IMAP_USER"
password_env = "DISPATCH_BOUNCES_IMAP_PASSWORD"
interval = 5
"""
    environ = {"DISPATCH_BOUNCES_IMAP_USER": dovecot.username, "DISPATCH_BOUNCES_IMAP_PASSWORD": dovecot.password}
    with running_intake(tmp_path, database_url, redis_server, bounce_tables=imap_table, environ=environ) as intake:
        [letter] = intake.send_letters()

        uid = dovecot.append(intake.bounce_for(letter, "postfix_hard.eml"))
        assert dovecot.uids() == [uid]

        wait_for(lambda: intake.state(letter) == "bounced", timeout=30)
        wait_for(lambda: intake.service.ledger.suppressions.find("email", MINISTER) is not None, timeout=10)
        suppressed = intake.service.ledger.suppressions.find("email", MINISTER)
        assert suppressed is not None and suppressed.delivery == letter
        wait_for(lambda: dovecot.uids() == [], timeout=30)
