"""EmailChannel: relay choice (sandbox vs live), credentials, blip retries, results."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dispatcher.channels.base import Channel, SendResult
from dispatcher.channels.email.channel import EmailChannel, is_loopback_host
from dispatcher.channels.email.message import build_message
from dispatcher.config.models import Section, SmtpRelay
from dispatcher.errors import OperationalError, PermanentError, TransientError
from dispatcher.settings import Settings
from tests.support.smtp import DROP, SmtpTestServer, make_section
from tests.test_email_dkim import outgoing

TARGET = "ambassador@embassy.example.org"


def settings_for(tmp_path: Path, **changes: Any) -> Settings:
    base = Settings(
        config_dir=tmp_path / "config",
        templates_dir=tmp_path / "templates",
        var_dir=tmp_path / "var",
        database_url="sqlite://",
        redis_url="redis://127.0.0.1:1/0",
    )
    return base.but(**changes)


def letter(section: Section, delivery_id: str = "d-0001") -> Any:
    return build_message(
        delivery_id=delivery_id,
        section=section,
        to_name="Ambassador Jane Smith",
        to_address=TARGET,
        supporter_name="Zoë Müller",
        supporter_email="zoe@example.net",
        subject="Free the detained activists",
        text="Dear Ambassador,\n",
        html="<p>Dear Ambassador,</p>",
        language="en",
        date=datetime(2024, 3, 5, 12, 0, tzinfo=UTC),
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server() -> Iterator[SmtpTestServer]:
    with SmtpTestServer() as smtp:
        yield smtp


def sandbox_channel(tmp_path: Path, port: int, **options: Any) -> EmailChannel:
    options.setdefault("blip_wait", 0.01)
    return EmailChannel(settings_for(tmp_path, sandbox_smtp_port=port), environ={}, **options)


# ---------------------------------------------------------------------------- sandbox mode


def test_sandbox_mode_sends_to_the_sandbox_whatever_the_sections_relay(tmp_path: Path, server: SmtpTestServer) -> None:
    # The section's relay is TEST-NET-1: were it used, the send would fail.
    section = make_section(relay=SmtpRelay(host="192.0.2.25", port=587, tls="starttls"))
    channel = sandbox_channel(tmp_path, server.port)
    try:
        result = channel.send(letter(section), section=section, recipient=TARGET)
    finally:
        channel.close()
    assert isinstance(result, SendResult)
    assert (result.code, result.text, result.remote_id) == (250, "2.0.0 Ok: queued as TEST0001", "TEST0001")
    assert result.duration_ms > 0
    [received] = server.messages
    assert received.mail_from == "bounces@aiusa.example.org"  # section.sender.envelope_sender
    assert received.rcpt_tos == (TARGET,)
    assert received.message["Message-ID"] == "<d-0001@aiusa.example.org>"
    assert received.login is None
    assert [relay.host for relay in channel.pools] == []  # closed


def test_sections_share_the_one_sandbox_pool(tmp_path: Path, server: SmtpTestServer) -> None:
    us = make_section(code="us")
    ch = make_section(
        code="ch",
        sender_name="Amnesty Schweiz",
        sender_address="appell@amnesty-ch.example.org",
        envelope=None,
        relay=SmtpRelay(host="192.0.2.41", port=465, tls="implicit"),
    )
    channel = sandbox_channel(tmp_path, server.port)
    try:
        channel.send(letter(us, "d-1"), section=us, recipient=TARGET)
        channel.send(letter(ch, "d-2"), section=ch, recipient=TARGET)
        assert [(r.host, r.port, r.tls) for r in channel.pools] == [("127.0.0.1", server.port, "none")]
    finally:
        channel.close()
    assert server.connections == 1
    assert [m.mail_from for m in server.messages] == ["bounces@aiusa.example.org", "appell@amnesty-ch.example.org"]


NOT_LOOPBACK = ["192.0.2.25", "smtp.example.org", "10.0.0.1", "0.0.0.0", "localhost.example.org"]  # noqa: S104


@pytest.mark.parametrize("host", NOT_LOOPBACK)
def test_sandbox_refuses_a_host_that_is_not_loopback(tmp_path: Path, host: str) -> None:
    channel = EmailChannel(settings_for(tmp_path, sandbox_smtp_host=host, sandbox_smtp_port=25), environ={})
    section = make_section()
    with pytest.raises(OperationalError, match="loopback"):
        channel.send(letter(section), section=section, recipient=TARGET)
    assert channel.pools == {}
    channel.close()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("LOCALHOST.", True), ("192.0.2.1", False), ("::", False), ("example.org", False), ("", False)],
)  # fmt: skip
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


# ---------------------------------------------------------------------------- live mode


def live_section(port: int) -> Section:
    relay = SmtpRelay(
        host="127.0.0.1", port=port, tls="none", username_env="TEST_SMTP_USER", password_env="TEST_SMTP_PASSWORD"
    )
    return make_section(relay=relay)


def test_live_mode_uses_the_sections_relay_and_credentials(tmp_path: Path) -> None:
    with SmtpTestServer(auth={"relay-user": "s3cret"}, auth_required=True) as relay:
        section = live_section(relay.port)
        environ = {"TEST_SMTP_USER": "relay-user", "TEST_SMTP_PASSWORD": "s3cret"}
        # The sandbox port is closed: live mode must not go there.
        channel = EmailChannel(settings_for(tmp_path, mode="live", sandbox_smtp_port=closed_port()), environ=environ)
        try:
            result = channel.send(letter(section), section=section, recipient=TARGET)
        finally:
            channel.close()
        assert result.code == 250
        [received] = relay.messages
        assert received.login == "relay-user"
        assert received.mail_from == "bounces@aiusa.example.org"


def test_live_mode_missing_credential_names_the_variable_not_a_value(tmp_path: Path) -> None:
    section = live_section(closed_port())
    channel = EmailChannel(settings_for(tmp_path, mode="live"), environ={"TEST_SMTP_USER": "relay-user-value"})
    with pytest.raises(OperationalError) as info:
        channel.send(letter(section), section=section, recipient=TARGET)
    assert "TEST_SMTP_PASSWORD" in str(info.value)
    assert "relay-user-value" not in str(info.value)
    channel.close()


def test_live_mode_bad_password_is_operational(tmp_path: Path) -> None:
    with SmtpTestServer(auth={"relay-user": "s3cret"}, auth_required=True) as relay:
        section = live_section(relay.port)
        environ = {"TEST_SMTP_USER": "relay-user", "TEST_SMTP_PASSWORD": "not-the-password"}
        channel = EmailChannel(settings_for(tmp_path, mode="live"), environ=environ)
        with pytest.raises(OperationalError) as info:
            channel.send(letter(section), section=section, recipient=TARGET)
        channel.close()
        assert info.value.code == 535
        assert "not-the-password" not in str(info.value)


def test_live_sections_with_the_same_relay_share_a_pool(tmp_path: Path, server: SmtpTestServer) -> None:
    relay = SmtpRelay(host="127.0.0.1", port=server.port, tls="none")
    first, second = make_section(code="us", relay=relay), make_section(code="usa", relay=relay)
    channel = EmailChannel(settings_for(tmp_path, mode="live"), environ={})
    try:
        channel.send(letter(first, "d-1"), section=first, recipient=TARGET)
        channel.send(letter(second, "d-2"), section=second, recipient=TARGET)
        assert len(channel.pools) == 1  # one pool, one connection
    finally:
        channel.close()
    assert server.connections == 1


# ---------------------------------------------------------------------------- blips and other errors


def test_a_blip_is_retried_in_process(tmp_path: Path, server: SmtpTestServer) -> None:
    server.script_rcpt([DROP])
    section = make_section()
    channel = sandbox_channel(tmp_path, server.port)
    try:
        result = channel.send(letter(section), section=section, recipient=TARGET)
    finally:
        channel.close()
    assert result.code == 250
    assert len(server.messages) == 1
    assert server.connections == 2


def test_blips_that_persist_become_transient(tmp_path: Path) -> None:
    section = make_section()
    channel = sandbox_channel(tmp_path, closed_port(), blip_attempts=3)
    with pytest.raises(TransientError) as info:
        channel.send(letter(section), section=section, recipient=TARGET)
    channel.close()
    assert type(info.value) is TransientError  # not BlipError: the ledger retries it later
    assert "after 3 quick tries" in info.value.message


def test_other_transient_errors_are_not_retried_in_process(tmp_path: Path, server: SmtpTestServer) -> None:
    server.script_rcpt([(450, "4.7.1 Greylisted")])
    section = make_section()
    channel = sandbox_channel(tmp_path, server.port)
    with pytest.raises(TransientError) as info:
        channel.send(letter(section), section=section, recipient=TARGET)
    channel.close()
    assert (info.value.code, info.value.message) == (450, "4.7.1 Greylisted")
    assert server.commands.count("RCPT") == 1


def test_permanent_errors_pass_through(tmp_path: Path, server: SmtpTestServer) -> None:
    server.script_rcpt([(550, "5.1.1 User unknown")])
    section = make_section()
    channel = sandbox_channel(tmp_path, server.port)
    with pytest.raises(PermanentError, match=r"5\.1\.1"):
        channel.send(letter(section), section=section, recipient=TARGET)
    channel.close()


def test_aclose_closes_the_connections(tmp_path: Path, server: SmtpTestServer) -> None:
    section = make_section()
    channel = sandbox_channel(tmp_path, server.port)
    channel.send(letter(section), section=section, recipient=TARGET)
    assert server.open_connections == 1
    channel.close()
    server.wait_for(lambda: server.open_connections == 0)
    with pytest.raises(RuntimeError):
        channel.send(letter(section), section=section, recipient=TARGET)


def test_the_threads_of_a_worker_share_one_pool(tmp_path: Path, server: SmtpTestServer) -> None:
    section = make_section()
    channel = sandbox_channel(tmp_path, server.port)
    try:
        with ThreadPoolExecutor(max_workers=6) as threads:
            sends = [
                threads.submit(channel.send, letter(section, f"d-{n}"), section=section, recipient=TARGET)
                for n in range(24)
            ]
            codes = [send.result(timeout=30).code for send in sends]
        assert codes == [250] * 24 and len(channel.pools) == 1
    finally:
        channel.close()
    assert len(server.messages) == 24
    assert 1 <= server.connections <= SmtpRelay(host="127.0.0.1", port=25).pool_size


async def test_deliver_on_an_event_loop_sends_from_a_thread_and_keeps_the_loop_free(
    tmp_path: Path, server: SmtpTestServer
) -> None:
    section = make_section()
    channel = sandbox_channel(tmp_path, server.port)
    server.hold_data(0.3)
    letter_ = channel.prepare(outgoing(section, "d-1"))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        report = await channel.deliver(letter_)
    finally:
        ticker.cancel()
        await channel.aclose()
    assert (report.code, report.tag) == (250, "d-1")
    assert ticks >= 10  # the loop went on while the relay sat on DATA
    assert [str(m.message["X-Dispatch-Delivery"]) for m in server.messages] == ["d-1"]


def test_is_a_channel(tmp_path: Path) -> None:
    channel = EmailChannel(settings_for(tmp_path), environ={})
    assert isinstance(channel, Channel)
    assert channel.name == "email"
