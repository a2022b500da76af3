"""The SMTP pool against a real server (aiosmtpd on loopback): reuse, recycling, reconnects,
and classification of what the server actually answers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.channels.email.pool import SmtpPool, read_reply, wire_data
from dispatcher.errors import BlipError, OperationalError, PermanentError, TransientError
from dispatcher.queue.window import SendWindow, WindowTicket
from tests.support.dovecot import make_test_ca
from tests.support.smtp import DROP, SmtpTestServer, french_letter_bytes

SENDER = "bounces@aiusa.example.org"
TARGET = "ambassador@embassy.example.org"


def letter(n: int = 1) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "appeals@aiusa.example.org"
    msg["To"] = TARGET
    msg["Subject"] = f"letter {n}"
    msg["Message-ID"] = f"<d-{n}@aiusa.example.org>"
    msg.set_content(f"letter number {n}\n")
    return msg


@pytest.fixture(params=[False, True], ids=["one command at a time", "pipelined"])
def server(request: pytest.FixtureRequest) -> Iterator[SmtpTestServer]:
    """Every test runs against a relay without PIPELINING and one with it (RFC 2920)."""
    with SmtpTestServer(pipelining=request.param) as smtp:
        yield smtp


def make_pool(smtp: SmtpTestServer, **options: object) -> SmtpPool:
    options.setdefault("tls", "none")
    options.setdefault("local_hostname", "localhost")
    options.setdefault("timeout", 5.0)
    return SmtpPool(smtp.host, smtp.port, **options)  # type: ignore[arg-type]


@pytest.fixture
def pool(server: SmtpTestServer) -> Iterator[SmtpPool]:
    p = make_pool(server)
    yield p
    p.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- reuse and recycling


def test_a_relay_that_offers_pipelining_gets_every_transaction_pipelined(
    server: SmtpTestServer, pool: SmtpPool
) -> None:
    for n in range(3):
        assert (pool.send(letter(n), SENDER, [TARGET]))[0] == 250
    assert pool.stats.pipelined == (3 if server.pipelining else 0)
    assert [m.message["Subject"] for m in server.messages] == ["letter 0", "letter 1", "letter 2"]
    assert [m.rcpt_tos for m in server.messages] == [(TARGET,)] * 3
    assert server.connections == 1


def test_one_connection_carries_many_messages(server: SmtpTestServer, pool: SmtpPool) -> None:
    for n in range(10):
        code, text = pool.send(letter(n), SENDER, [TARGET])
        assert (code, text) == (250, f"2.0.0 Ok: queued as TEST{n + 1:04d}")
    assert server.connections == 1
    assert pool.stats.connections_opened == 1
    assert pool.stats.messages_sent == 10
    received = server.messages
    assert [m.message["Subject"] for m in received] == [f"letter {n}" for n in range(10)]
    assert {(m.mail_from, m.rcpt_tos) for m in received} == {(SENDER, (TARGET,))}


def test_concurrent_senders_share_at_most_size_connections(server: SmtpTestServer) -> None:
    pool = make_pool(server, size=3)
    try:
        with ThreadPoolExecutor(max_workers=8) as threads:  # a worker's threads, and more
            results = list(threads.map(lambda n: pool.send(letter(n), SENDER, [TARGET]), range(30)))
    finally:
        pool.close()
    assert all(code == 250 for code, _ in results)
    assert len(server.messages) == 30
    assert 1 <= server.connections <= 3
    assert pool.stats.connections_opened == server.connections


def test_connection_recycled_after_max_messages(server: SmtpTestServer) -> None:
    pool = make_pool(server, max_messages_per_connection=3)
    for n in range(7):
        pool.send(letter(n), SENDER, [TARGET])
    pool.close()
    assert server.connections == 3  # 3 + 3 + 1
    assert pool.stats.connections_opened == pool.stats.connections_closed == 3
    assert server.commands.count("QUIT") == 3  # retired politely, not dropped
    assert len(server.messages) == 7


def test_idle_connection_closed_after_idle_timeout(server: SmtpTestServer) -> None:
    pool = make_pool(server, idle_timeout=0.1)
    try:
        pool.send(letter(1), SENDER, [TARGET])
        assert server.open_connections == 1
        server.wait_for(lambda: server.open_connections == 0)
        assert pool.idle_connections == 0
        assert "QUIT" in server.commands
        pool.send(letter(2), SENDER, [TARGET])
    finally:
        pool.close()
    assert server.connections == 2


def test_aclose_quits_idle_connections_and_refuses_new_sends(server: SmtpTestServer) -> None:
    pool = make_pool(server)
    pool.send(letter(), SENDER, [TARGET])
    pool.close()
    assert server.commands[-1] == "QUIT"
    server.wait_for(lambda: server.open_connections == 0)
    with pytest.raises(RuntimeError, match="closed"):
        pool.send(letter(), SENDER, [TARGET])


# ---------------------------------------------------------------------------- reconnecting


def test_reconnects_after_the_server_dropped_an_idle_connection(server: SmtpTestServer, pool: SmtpPool) -> None:
    pool.send(letter(1), SENDER, [TARGET])
    server.drop_connections()
    time.sleep(0.02)  # let the client see the EOF: found dead at checkout
    pool.send(letter(2), SENDER, [TARGET])
    assert server.connections == 2
    assert len(server.messages) == 2
    assert pool.stats.stale_retries == 0


def test_connection_found_dead_at_mail_from_is_retried_on_a_fresh_one(server: SmtpTestServer, pool: SmtpPool) -> None:
    pool.send(letter(1), SENDER, [TARGET])
    server.script_mail([DROP])  # the reused connection dies just as MAIL FROM goes out
    code, _ = pool.send(letter(2), SENDER, [TARGET])
    assert code == 250
    assert pool.stats.stale_retries == 1
    assert server.connections == 2
    assert [m.message["Subject"] for m in server.messages] == ["letter 1", "letter 2"]


def test_fresh_connection_dying_is_a_blip_not_a_silent_retry(server: SmtpTestServer, pool: SmtpPool) -> None:
    server.script_mail([DROP])
    with pytest.raises(BlipError):
        pool.send(letter(), SENDER, [TARGET])
    assert pool.stats.stale_retries == 0
    assert server.messages == []


def test_disconnect_after_data_is_a_blip_and_the_connection_is_dropped(server: SmtpTestServer, pool: SmtpPool) -> None:
    server.script_data([DROP])
    with pytest.raises(BlipError, match="DATA"):
        pool.send(letter(1), SENDER, [TARGET])
    assert pool.stats.connections_closed == 1
    pool.send(letter(2), SENDER, [TARGET])
    assert server.connections == 2


def test_a_relay_that_does_not_answer_data_times_out_as_a_blip_and_is_dropped(server: SmtpTestServer) -> None:
    pool = make_pool(server, timeout=0.3)
    window = SendWindow()
    server.hold_data(3.0)
    started = time.monotonic()
    with pytest.raises(BlipError, match="Timed out waiting for server response during DATA"):
        pool.send(letter(1), SENDER, [TARGET], window=window.ticket())
    assert time.monotonic() - started < 2.0
    # no 250: the letter is not in the send window, and nobody can tell which reply comes next
    assert not window.occupied
    assert pool.stats.connections_closed == 1
    pool.send(letter(2), SENDER, [TARGET])
    assert server.connections == 2
    pool.close()


def test_waiting_for_the_send_window_does_not_count_against_the_relay_timeout(server: SmtpTestServer) -> None:
    # Each command has the whole timeout, from when it is sent: a letter that waited its turn
    # for DATA longer than that (another letter of the process being recorded) still goes.
    pool = make_pool(server, timeout=0.3)
    window = SendWindow()
    holder = WindowTicket(window)
    holder.acquire()
    threading.Timer(0.8, holder.close).start()
    server.hold_data(0.2)
    code, _ = pool.send(letter(1), SENDER, [TARGET], window=window.ticket())
    assert code == 250
    assert [m.message["Subject"] for m in server.messages] == ["letter 1"]
    assert pool.stats.connections_closed == 0
    pool.close()


def test_connection_refused_is_a_blip() -> None:
    pool = SmtpPool("127.0.0.1", free_port(), tls="none", local_hostname="localhost", timeout=2.0)
    with pytest.raises(BlipError):
        pool.send(letter(), SENDER, [TARGET])
    assert pool.stats.connections_opened == 0
    pool.close()


# ---------------------------------------------------------------------------- refusals, through the server


def test_greylisted_twice_then_accepted_on_the_same_connection(server: SmtpTestServer, pool: SmtpPool) -> None:
    server.script_rcpt([(450, "4.7.1 Greylisted, try again in 300 seconds")] * 2)
    for _ in range(2):
        with pytest.raises(TransientError) as info:
            pool.send(letter(), SENDER, [TARGET])
        assert type(info.value) is TransientError
        assert info.value.code == 450
        assert info.value.message == "4.7.1 Greylisted, try again in 300 seconds"
        assert info.value.retry_after == 300.0
    code, _ = pool.send(letter(), SENDER, [TARGET])
    assert code == 250
    assert server.connections == 1
    assert server.commands.count("RSET") == 2


def test_unknown_user_is_permanent_and_the_connection_stays_usable(server: SmtpTestServer, pool: SmtpPool) -> None:
    server.script_rcpt([(550, "5.1.1 <nobody@embassy.example.org>: Recipient address rejected")])
    with pytest.raises(PermanentError) as info:
        pool.send(letter(1), SENDER, ["nobody@embassy.example.org"])
    assert info.value.code == 550
    assert info.value.message.startswith("5.1.1 ")
    assert server.commands[-1] == "RSET"
    pool.send(letter(2), SENDER, [TARGET])
    assert server.connections == 1
    assert [m.message["Subject"] for m in server.messages] == ["letter 2"]


def test_421_is_transient_and_drops_the_connection(server: SmtpTestServer, pool: SmtpPool) -> None:
    server.script_rcpt([(421, "4.3.2 Service shutting down, closing transmission channel")])
    with pytest.raises(TransientError) as info:
        pool.send(letter(1), SENDER, [TARGET])
    assert type(info.value) is TransientError
    assert info.value.code == 421
    assert pool.stats.connections_closed == 1
    assert pool.idle_connections == 0
    pool.send(letter(2), SENDER, [TARGET])
    assert server.connections == 2


def test_sender_refused_is_operational(server: SmtpTestServer, pool: SmtpPool) -> None:
    server.script_mail([(550, "5.7.1 Sender address not owned by user")])
    with pytest.raises(OperationalError) as info:
        pool.send(letter(), SENDER, [TARGET])
    assert info.value.code == 550


def test_content_refused_at_data_is_permanent(server: SmtpTestServer, pool: SmtpPool) -> None:
    server.script_data([(554, "5.6.0 Message content rejected")])
    with pytest.raises(PermanentError) as info:
        pool.send(letter(), SENDER, [TARGET])
    assert (info.value.code, info.value.message) == (554, "5.6.0 Message content rejected")
    assert server.messages == []
    pool.send(letter(), SENDER, [TARGET])
    assert server.connections == 1


def test_one_refused_recipient_aborts_the_whole_transaction(server: SmtpTestServer, pool: SmtpPool) -> None:
    server.script_rcpt([(250, "2.1.5 Ok"), (550, "5.1.1 Unknown user")])
    with pytest.raises(PermanentError):
        pool.send(letter(), SENDER, [TARGET, "nobody@embassy.example.org"])
    assert "DATA" not in server.commands
    assert server.commands[-1] == "RSET"


def test_bad_addresses_are_refused_before_any_connection(server: SmtpTestServer, pool: SmtpPool) -> None:
    with pytest.raises(PermanentError):
        pool.send(letter(), SENDER, ["victim@example.org> NOTIFY=NEVER"])
    with pytest.raises(PermanentError, match="ASCII"):
        pool.send(letter(), SENDER, ["président@élysée.example.org"])
    with pytest.raises(OperationalError):
        pool.send(letter(), "bounces@aiusa.example.org\r\nRSET", [TARGET])
    assert server.connections == 0


def test_a_refused_recipient_never_lets_the_message_reach_the_others(server: SmtpTestServer) -> None:
    # aiosmtpd answers the pipelined DATA with 354: another recipient was accepted. Whatever the
    # client wrote next would be the message, so the pool closes the connection instead (an
    # RSET would be read as the message and hang until the relay's 30 s timeout).
    pool = make_pool(server, timeout=30.0)
    server.script_rcpt([(550, "5.1.1 Unknown user")])
    started = time.monotonic()
    with pytest.raises(PermanentError) as info:
        pool.send(letter(1), SENDER, ["nobody@embassy.example.org", TARGET])
    assert time.monotonic() - started < 5
    assert info.value.code == 550
    time.sleep(0.05)  # the server has seen the connection end, or the RSET
    assert server.messages == []
    if server.pipelining:
        assert pool.stats.connections_closed == 1
    else:
        assert "DATA" not in server.commands
        assert server.commands[-1] == "RSET"
    pool.send(letter(2), SENDER, [TARGET])
    assert [m.message["Subject"] for m in server.messages] == ["letter 2"]
    pool.close()


def test_bcc_is_not_transmitted(server: SmtpTestServer, pool: SmtpPool) -> None:
    msg = letter()
    msg["Bcc"] = "hidden@example.org"
    pool.send(msg, SENDER, [TARGET])
    assert b"hidden@example.org" not in server.messages[0].data


# ---------------------------------------------------------------------------- authentication and TLS


def test_login_with_credentials() -> None:
    with SmtpTestServer(auth={"relay-user": "s3cret"}, auth_required=True) as smtp:
        pool = make_pool(smtp, username="relay-user", password="s3cret")
        pool.send(letter(), SENDER, [TARGET])
        pool.send(letter(), SENDER, [TARGET])
        pool.close()
        assert [m.login for m in smtp.messages] == ["relay-user", "relay-user"]
        assert smtp.commands.count("AUTH") == 1  # once per connection, not per message


def test_bad_credentials_are_operational() -> None:
    with SmtpTestServer(auth={"relay-user": "s3cret"}, auth_required=True) as smtp:
        pool = make_pool(smtp, username="relay-user", password="wrong")
        with pytest.raises(OperationalError) as info:
            pool.send(letter(), SENDER, [TARGET])
        pool.close()
        assert info.value.code == 535
        assert "5.7.8" in info.value.message
        assert "wrong" not in str(info.value)


def test_missing_login_is_operational() -> None:
    with SmtpTestServer(auth={"relay-user": "s3cret"}, auth_required=True) as smtp:
        pool = make_pool(smtp)
        with pytest.raises(OperationalError) as info:
            pool.send(letter(), SENDER, [TARGET])
        pool.close()
        assert info.value.code == 530


def test_starttls_required_but_not_offered_is_operational(server: SmtpTestServer) -> None:
    pool = make_pool(server, tls="starttls")
    with pytest.raises(OperationalError, match="STARTTLS"):
        pool.send(letter(), SENDER, [TARGET])
    pool.close()
    assert server.messages == []


def test_pipelining_over_starttls(tmp_path: Path) -> None:
    ca, cert, key = make_test_ca(tmp_path, hostname="localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(ca))
    with SmtpTestServer(pipelining=True, tls_context=server_context) as smtp:
        pool = make_pool(smtp, tls="starttls", tls_context=client_context)
        smtp.script_rcpt([(450, "4.7.1 Greylisted, try again in 300 seconds")])
        with pytest.raises(TransientError):
            pool.send(letter(1), SENDER, [TARGET])
        for n in (2, 3):
            pool.send(letter(n), SENDER, [TARGET])
        pool.close()
        assert pool.stats.pipelined == 3
        assert [m.message["Subject"] for m in smtp.messages] == ["letter 2", "letter 3"]
        # the refusal's RSET went through the TLS connection too, which carried the rest
        assert "RSET" in smtp.commands
        assert (pool.stats.connections_opened, pool.stats.connections_closed) == (1, 1)


def test_implicit_tls_to_a_plain_server_is_operational(server: SmtpTestServer) -> None:
    pool = make_pool(server, tls="implicit")
    with pytest.raises(OperationalError, match="TLS"):
        pool.send(letter(), SENDER, [TARGET])
    pool.close()


# ---------------------------------------------------------------------------- the message's bytes

LINES = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"x", b"\r", b"\n", b"\r\n", b"\n."]), max_size=12)


@given(st.builds(b"".join, LINES))
def test_the_bytes_after_data_are_aiosmtplibs_whenever_the_shortcut_is_taken(data: bytes) -> None:
    wire = wire_data(data)
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    assert wire is None or wire == expected
    # it is taken exactly when every line already ends in CRLF
    assert (wire is not None) == (normalize_message_line_endings(data) in (data, data + b"\r\n"))


@pytest.mark.parametrize(
    "body",
    [
        b".a line starting with a dot\r\n.\r\n..two dots\r\n.\r\nthe end\r\n",  # our letters: CRLF only
        b"no line end at the end\r\n.dot",
        b"bare LF\n.dot after it\nand a lone CR\rhere\r\n",  # through aiosmtplib's own data()
    ],
    ids=["crlf", "no-final-crlf", "bare-lf-and-cr"],
)
def test_the_relay_receives_what_aiosmtplibs_own_data_sends(server: SmtpTestServer, body: bytes) -> None:
    raw = b"From: appeals@aiusa.example.org\r\nTo: " + TARGET.encode() + b"\r\nSubject: dots\r\n\r\n" + body

    async def library() -> None:
        async with aiosmtplib.SMTP(hostname=server.host, port=server.port, start_tls=False) as smtp:
            await smtp.sendmail(SENDER, [TARGET], raw)

    asyncio.run(library())
    pool = make_pool(server)
    pool.send(raw, SENDER, [TARGET])
    pool.close()
    library, ours = server.messages
    assert ours.data == library.data
    assert ours.message["Subject"] == "dots"


def test_a_letter_we_write_takes_the_shortcut() -> None:
    data = french_letter_bytes(
        text="Madame l'Ambassadrice,\n\n.Une ligne qui commence par un point.\n" + "é" * 200 + "\n",
        html="<p>Madame l'Ambassadrice,</p>\n.<p>point</p>",
        to_address=TARGET,
    )
    assert wire_data(data) == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


# ---------------------------------------------------------------------------- replies read together

REPLIES = st.lists(
    st.tuples(
        st.sampled_from([250, 251, 354, 421, 450, 503, 550, 554]),
        st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=20), min_size=1, max_size=3),
    ),
    min_size=1,
    max_size=4,
)


def _wire(code: int, lines: list[str]) -> bytes:
    return b"".join(f"{code}{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode() for i, line in enumerate(lines))


@given(REPLIES, st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_replies_that_arrive_together_or_in_pieces_are_each_read_as_aiosmtplib_reads_one(
    replies: list[tuple[int, list[str]]], cuts: list[int]
) -> None:
    stream = b"".join(_wire(code, lines) for code, lines in replies)
    expected = []
    for code, lines in replies:
        # aiosmtplib's own reading of each reply alone (a protocol, fed the bytes as they come)
        one = aiosmtplib.protocol.SMTPProtocol(loop=asyncio.new_event_loop())
        one._buffer.extend(_wire(code, lines))
        expected.append(one._read_response_from_buffer())

    edges = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    with relay_end() as (smtp, relay):
        for start, end in itertools.pairwise(edges):
            relay.sendall(stream[start:end])  # (all there before the first read: as they come together)
        read = [read_reply(smtp) for _ in replies]
    assert [aiosmtplib.SMTPResponse(code, text) for code, text in read] == expected


@contextlib.contextmanager
def relay_end() -> Iterator[tuple[smtplib.SMTP, socket.socket]]:
    """A client connection (smtplib's, as the pool's) and the relay's end of it."""
    ours, relay = socket.socketpair()
    smtp = smtplib.SMTP()
    smtp.sock = ours
    try:
        yield smtp, relay
    finally:
        smtp.close()
        relay.close()


def test_a_reply_that_is_not_smtp_fails_the_read() -> None:
    with relay_end() as (smtp, relay):
        relay.sendall(b"250 2.1.0 Ok\r\nHTTP/1.1 400 Bad Request\r\n")
        assert read_reply(smtp) == (250, "2.1.0 Ok")
        with pytest.raises(aiosmtplib.SMTPResponseException, match="Malformed SMTP response line"):
            read_reply(smtp)


def test_a_relay_gone_mid_reply_is_a_lost_connection() -> None:
    with relay_end() as (smtp, relay):
        relay.sendall(b"250-2.1.0 Ok\r\n")
        relay.close()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            read_reply(smtp)
