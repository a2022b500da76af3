"""The IMAP bounce poller against a real dovecot: what a section whose bounces land in a
mailbox sees happen to them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from structlog.testing import capture_logs

from dispatcher.channels.email.imap import FAILED_KEYWORD, BounceMailbox
from dispatcher.errors import MailboxError, MailboxLoginRefused, OperationalError
from tests.support.dovecot import DovecotServer
from tests.support.services import free_port

MiB = 1024 * 1024
SUPPORTER = "Ada Quintessa Lovelace"


def bounce(n: int, extra: str = "") -> bytes:
    """A small DSN that quotes our letter, as real bounces do (so it holds a supporter's name)."""
    return (
        "From: MAILER-DAEMON@relay.example.org\r\n"
        "To: bounces+L{n}@bounces.example.org\r\n"
        f"Subject: Undelivered Mail Returned to Sender {n}{extra}\r\n"
        f"Message-ID: <dsn-{n}@relay.example.org>\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n'
        "MIME-Version: 1.0\r\n"
        "\r\n"
        "--b\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; relay.example.org\r\n\r\n"
        "Final-Recipient: rfc822; minister@gov.example\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: {SUPPORTER} <appeals@section.example.org>\r\nSubject: Free the prisoner\r\n"
        "--b--\r\n"
    ).encode()


# declared multipart, a boundary that never comes, a header line without a colon, bytes that
# are not UTF-8, and no final CRLF
MALFORMED = (
    b"From: postmaster@relay.example.org\r\n"
    b"Content-Type: multipart/report; boundary=\r\n"
    b"this is not a header\r\n"
    b"Subject: =?utf-8?q?broken=ZZ?=\r\n"
    b"\r\n"
    b"--nowhere\r\n\xff\xfe\x80 half a bounce"
)


def big_bounce() -> bytes:
    """A 10 MB bounce: a DSN that came back with a huge attachment."""
    head = bounce(99)
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3\r\n"
    return head + line * (10 * 1000 * 1000 // len(line))


@dataclass
class Recorder:
    """A handler that records what it was handed; raises for messages holding ``fail_on``."""

    fail_on: bytes | None = None
    calls: list[tuple[bytes, bool]] = field(default_factory=list)
    received: threading.Event = field(default_factory=threading.Event)

    def __call__(self, raw: bytes, truncated: bool) -> None:
        self.calls.append((raw, truncated))
        if self.fail_on is not None and self.fail_on in raw:
            raise ValueError(f"cannot read bounce from {SUPPORTER}")
        self.received.set()

    @property
    def handed(self) -> list[bytes]:
        return [raw for raw, _ in self.calls]


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    with DovecotServer() as server:
        yield server


@pytest.fixture(scope="module")
def dovecot_tls() -> Iterator[DovecotServer]:
    with DovecotServer(tls=True) as server:
        yield server


def mailbox(server: DovecotServer, **kwargs: object) -> BounceMailbox:
    options: dict[str, object] = {"tls": "none", "timeout": 10.0}
    options.update(kwargs)
    return BounceMailbox(
        server.host,
        server.port,
        username=server.username,
        password=server.password,
        **options,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- handing over


def test_each_bounce_is_handed_over_whole_once_and_then_removed(dovecot: DovecotServer) -> None:
    sent = [bounce(1), bounce(2), MALFORMED, bounce(3)]
    for raw in sent:
        dovecot.append(raw)
    handler = Recorder()

    result = mailbox(dovecot).poll(handler)

    assert handler.calls == [(raw, False) for raw in sent]
    assert (result.found, result.handled, result.failed, result.more) == (4, 4, 0, False)
    assert dovecot.uids() == []

    again = Recorder()
    assert mailbox(dovecot).poll(again).found == 0
    assert again.calls == []

    later = bounce(4)
    dovecot.append(later)
    mailbox(dovecot).poll(again)
    assert again.calls == [(later, False)]


def test_a_10_mb_bounce_is_handed_over_cut_and_never_read_whole(dovecot: DovecotServer) -> None:
    huge = big_bounce()
    assert len(huge) > 9 * 1000 * 1000
    dovecot.append(huge)
    dovecot.append(bounce(1))
    handler = Recorder()

    result = mailbox(dovecot).poll(handler)

    assert handler.calls == [(huge[:MiB], True), (bounce(1), False)]
    assert (result.handled, result.truncated) == (2, 1)
    assert dovecot.uids() == []
    # dovecot's own count of what it sent to each session, ours included
    assert max(dovecot.bytes_sent()) < 2 * MiB


def test_a_failing_handler_keeps_its_bounce_and_the_others_are_handled(dovecot: DovecotServer) -> None:
    dovecot.append(bounce(1))
    bad = dovecot.append(bounce(2, " FAILS"))
    dovecot.append(bounce(3))
    handler = Recorder(fail_on=b"FAILS")

    with capture_logs() as logs:
        result = mailbox(dovecot).poll(handler)

    assert handler.handed == [bounce(1), bounce(2, " FAILS"), bounce(3)]
    assert (result.handled, result.failed) == (2, 1)
    assert dovecot.uids() == [bad]
    assert "\\Deleted" not in dovecot.flags(bad)
    failed = [e for e in logs if e["event"] == "imap.bounce_failed"]
    assert failed and failed[0]["uid"] == bad and failed[0]["error_type"] == "ValueError"
    assert not any(SUPPORTER in repr(event) for event in logs)

    # the next poll offers it again, and a mended handler takes it
    mended = Recorder()
    mailbox(dovecot).poll(mended)
    assert mended.handed == [bounce(2, " FAILS")]
    assert dovecot.uids() == []


def test_a_bounce_that_keeps_failing_does_not_hold_up_the_others(dovecot: DovecotServer) -> None:
    dovecot.append(bounce(1, " FAILS"))
    dovecot.append(bounce(2))
    dovecot.append(bounce(3))
    poller = mailbox(dovecot, limit=1)
    handler = Recorder(fail_on=b"FAILS")

    results = [poller.poll(handler) for _ in range(3)]

    # one a poll: the failed one goes behind the others that are waiting
    assert handler.handed == [bounce(1, " FAILS"), bounce(2), bounce(3)]
    assert [r.handled for r in results] == [0, 1, 1]
    assert len(dovecot.uids()) == 1
    # and it is still offered, now that it is the only one
    assert poller.poll(handler).found == 1
    assert handler.handed[-1] == bounce(1, " FAILS")


def test_a_bounce_that_keeps_failing_is_set_aside_for_an_operator(dovecot: DovecotServer) -> None:
    bad = dovecot.append(bounce(1, " FAILS"))
    dovecot.append(bounce(2))
    poller = mailbox(dovecot, max_failures=2)
    handler = Recorder(fail_on=b"FAILS")

    first = poller.poll(handler)
    dovecot.append(bounce(3))
    second = poller.poll(handler)

    assert (first.set_aside, second.set_aside) == (0, 1)
    assert handler.handed == [bounce(1, " FAILS"), bounce(2), bounce(3), bounce(1, " FAILS")]
    # kept, marked, and no longer offered
    assert dovecot.uids() == [bad]
    assert FAILED_KEYWORD in dovecot.flags(bad)
    assert poller.poll(handler).found == 0


def test_a_handler_that_takes_nothing_sets_nothing_aside(dovecot: DovecotServer) -> None:
    """The handler's own outage (its database down) is no bounce's fault: all are kept, none
    marked, and all are handed over once it is back."""
    sent = [bounce(1), bounce(2)]
    for raw in sent:
        dovecot.append(raw)
    poller = mailbox(dovecot, max_failures=2)
    down = Recorder(fail_on=b"Undelivered")

    results = [poller.poll(down) for _ in range(3)]

    assert [r.set_aside for r in results] == [0, 0, 0]
    assert all(FAILED_KEYWORD not in dovecot.flags(uid) for uid in dovecot.uids())
    back = Recorder()
    poller.poll(back)
    assert back.handed == sent
    assert dovecot.uids() == []


def test_a_bounce_handled_by_a_poll_that_died_before_expunging_is_not_handed_over_again(
    dovecot: DovecotServer,
) -> None:
    handled = dovecot.append(bounce(1))
    dovecot.append(bounce(2))
    with dovecot.client() as imap:  # what a poll that died after its STORE leaves behind
        imap.uid("STORE", str(handled), "+FLAGS.SILENT", r"(\Deleted)")
    handler = Recorder()

    mailbox(dovecot).poll(handler)

    assert handler.handed == [bounce(2)]
    assert dovecot.uids() == []


def test_a_folder_other_than_inbox(dovecot: DovecotServer) -> None:
    dovecot.create_folder("Bounces")
    dovecot.append(bounce(1), folder="Bounces")
    dovecot.append(bounce(2))  # INBOX: not ours to touch
    handler = Recorder()

    mailbox(dovecot, folder="Bounces").poll(handler)

    assert handler.handed == [bounce(1)]
    assert dovecot.uids("Bounces") == []
    assert len(dovecot.uids()) == 1


def test_a_server_without_uidplus_gets_a_plain_expunge() -> None:
    # dovecot announcing only what an old server would; without UID EXPUNGE we fall back
    with DovecotServer(extra_config={"imap_capability": "IMAP4rev1 LITERAL+ IDLE"}) as old_server:
        old_server.append(bounce(1))
        kept = old_server.append(bounce(2, " FAILS"))
        handler = Recorder(fail_on=b"FAILS")

        result = mailbox(old_server).poll(handler)

        assert (result.handled, result.failed) == (1, 1)
        assert old_server.uids() == [kept]


# --------------------------------------------------------------------------- server trouble


def test_a_wrong_password_is_a_clear_error_naming_user_and_host_not_the_password(dovecot: DovecotServer) -> None:
    dovecot.append(bounce(1))
    poller = BounceMailbox(dovecot.host, dovecot.port, username=dovecot.username, password="wrong-Pa55word", tls="none")

    with pytest.raises(MailboxLoginRefused) as refused:
        poller.poll(Recorder())

    text = str(refused.value)
    assert isinstance(refused.value, OperationalError)
    assert dovecot.username in text and f"{dovecot.host}:{dovecot.port}" in text
    assert "wrong-Pa55word" not in text
    assert len(dovecot.uids()) == 1


def test_a_missing_folder_is_a_clear_error(dovecot: DovecotServer) -> None:
    with pytest.raises(MailboxError, match="'Bounces'"):
        mailbox(dovecot, folder="Bounces").poll(Recorder())


def test_nothing_listening_is_a_clear_error() -> None:
    port = free_port()
    poller = BounceMailbox("127.0.0.1", port, username="bounces", password="x", tls="none", timeout=5)
    with pytest.raises(MailboxError, match=f"cannot reach 127.0.0.1:{port}"):
        poller.poll(Recorder())


def test_run_forever_rides_out_an_outage(dovecot: DovecotServer) -> None:
    poller = mailbox(dovecot)
    handler = Recorder()
    stop = threading.Event()
    dovecot.stop()

    with capture_logs() as logs:
        thread = threading.Thread(target=poller.run_forever, args=(handler, 0.05, stop), kwargs={"max_backoff": 0.2})
        thread.start()
        try:
            assert _wait_for(lambda: any(e["event"] == "imap.poll_failed" for e in logs))
            dovecot.start()
            dovecot.append(bounce(1))
            assert handler.received.wait(30)
        finally:
            stop.set()
            thread.join(30)

    assert not thread.is_alive()
    assert handler.handed == [bounce(1)]
    assert any(e["event"] == "imap.recovered" for e in logs)
    assert _wait_for(lambda: dovecot.uids() == [])


# --------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_tls_with_a_private_ca(dovecot_tls: DovecotServer, tls: str) -> None:
    port = dovecot_tls.imaps_port if tls == "implicit" else dovecot_tls.port
    dovecot_tls.append(bounce(1))

    untrusting = BounceMailbox(
        "127.0.0.1",
        port,
        username=dovecot_tls.username,
        password=dovecot_tls.password,
        tls=tls,  # type: ignore[arg-type]
    )
    with pytest.raises(MailboxError, match="not trusted"):
        untrusting.poll(Recorder())

    trusting = BounceMailbox(
        "127.0.0.1",
        port,
        username=dovecot_tls.username,
        password=dovecot_tls.password,
        tls=tls,  # type: ignore[arg-type]
        ca_file=dovecot_tls.ca_file,
    )
    handler = Recorder()
    trusting.poll(handler)

    assert handler.handed == [bounce(1)]
    assert dovecot_tls.uids() == []
    assert any(", TLS" in line for line in dovecot_tls.log_lines(f"Login: user=<{dovecot_tls.username}>"))


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False
