"""The sandbox SMTP server: .eml files with the envelope on top, and its command line."""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from dispatcher.channels.email.channel import EmailChannel
from dispatcher.channels.email.message import build_message
from dispatcher.channels.email.pool import SmtpPool
from dispatcher.sandbox.smtp import SandboxSMTP, safe_file_stem
from dispatcher.settings import Settings
from tests.support.smtp import make_section

TARGET = "ambassador@embassy.example.org"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxSMTP]:
    with SandboxSMTP(tmp_path / "mail") as server:
        yield server


def letter(delivery_id: str = "d-0001", supporter: str = "Zoë Müller") -> EmailMessage:
    return build_message(
        delivery_id=delivery_id,
        section=make_section(),
        to_name="Ambassador Jane Smith",
        to_address=TARGET,
        supporter_name=supporter,
        supporter_email="zoe.mueller@example.net",
        subject="Free the detained activists",
        text="Dear Ambassador,\n.\nA line that is only a dot, above.\n",
        html="<p>Dear Ambassador,</p>",
        language="en",
        date=datetime(2024, 3, 5, 12, 0, tzinfo=UTC),
    )


def emls(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.eml"))


def test_channel_in_sandbox_mode_writes_an_eml_file(tmp_path: Path, sandbox: SandboxSMTP) -> None:
    settings = Settings(
        config_dir=tmp_path, templates_dir=tmp_path, var_dir=tmp_path / "var", database_url="", redis_url=""
    ).but(sandbox_smtp_port=sandbox.port)
    section = make_section()
    channel = EmailChannel(settings, environ={})
    try:
        result = channel.send(letter(), section=section, recipient=TARGET)
    finally:
        channel.close()

    [path] = emls(sandbox.directory)
    assert path.name.endswith("-d-0001_aiusa.example.org.eml")
    assert result.remote_id == path.stem  # the reply names the file
    raw = path.read_bytes()
    assert raw.startswith(
        b"X-Sandbox-Envelope-From: bounces@aiusa.example.org\r\n"
        b"X-Sandbox-Envelope-To: ambassador@embassy.example.org\r\n"
    )
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Message-ID"] == "<d-0001@aiusa.example.org>"
    assert parsed["From"].addresses[0].display_name == "Zoë Müller via Amnesty International USA"
    plain = parsed.get_body(("plain",))
    assert plain is not None
    assert plain.get_content().replace("\r\n", "\n") == "Dear Ambassador,\n.\nA line that is only a dot, above.\n"
    assert [p.name for p in sandbox.directory.iterdir()] == [path.name]  # no temporary files left


async def test_every_envelope_recipient_and_resend_is_kept(sandbox: SandboxSMTP) -> None:
    async with aiosmtplib.SMTP(hostname=sandbox.host, port=sandbox.port, local_hostname="localhost") as client:
        for _ in range(2):  # a retry of the same delivery reuses its Message-ID
            await client.send_message(letter(), sender="bounces@aiusa.example.org", recipients=[TARGET, "cc@x.org"])
    files = emls(sandbox.directory)
    assert len(files) == 2
    assert all(b"X-Sandbox-Envelope-To: ambassador@embassy.example.org, cc@x.org\r\n" in f.read_bytes() for f in files)


def test_the_sandbox_offers_pipelining_and_keeps_what_comes_pipelined(sandbox: SandboxSMTP) -> None:
    # As the relays it stands for: the pool sends MAIL, RCPT and DATA in one write here too.
    pool = SmtpPool(sandbox.host, sandbox.port, tls="none", local_hostname="localhost")
    try:
        for n in (1, 2):
            pool.send(letter(f"d-000{n}"), "bounces@aiusa.example.org", [TARGET])
    finally:
        pool.close()
    assert pool.stats.pipelined == 2
    files = emls(sandbox.directory)
    assert [f.name.rsplit("-", 1)[1] for f in files] == ["0001_aiusa.example.org.eml", "0002_aiusa.example.org.eml"]
    parsed = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    plain = parsed.get_body(("plain",))
    assert plain is not None
    assert plain.get_content().replace("\r\n", "\n") == "Dear Ambassador,\n.\nA line that is only a dot, above.\n"


async def test_message_without_message_id(sandbox: SandboxSMTP) -> None:
    msg = EmailMessage()
    msg["Subject"] = "no id"
    msg.set_content("x\n")
    await aiosmtplib.send(
        msg, hostname=sandbox.host, port=sandbox.port, sender="a@b.org", recipients=["c@d.org"], local_hostname="x"
    )
    [path] = emls(sandbox.directory)
    assert path.name.endswith("-no-message-id.eml")


@pytest.mark.parametrize(
    ("message_id", "suffix"),
    [
        ("<d-1@aiusa.example.org>", "d-1_aiusa.example.org"),
        ("<../../etc/passwd@x>", "etc_passwd_x"),
        ("<a b/c\\d@x>", "a_b_c_d_x"),
        (None, "no-message-id"),
        ("<>", "no-message-id"),
    ],
)
def test_safe_file_stem(message_id: str | None, suffix: str) -> None:
    stem = safe_file_stem(message_id, datetime(2024, 1, 31, 12, 5, 1, 123456, tzinfo=UTC))
    assert stem == f"20240131T120501123456Z-{suffix}"


def test_port_is_only_known_while_running(tmp_path: Path) -> None:
    server = SandboxSMTP(tmp_path)
    with pytest.raises(RuntimeError):
        _ = server.port
    server.start()
    try:
        assert server.port > 0
    finally:
        server.stop()


def next_event(proc: subprocess.Popen[bytes], name: str, seen: list[str], timeout: float = 10.0) -> dict[str, Any]:
    """The next JSON log line of ``proc`` whose event is ``name``; every line read goes to ``seen``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stdout], [], [], left)[0]:
            break
        line = proc.stdout.readline().decode()  # unbuffered pipe: select() sees every line
        if not line:
            break
        seen.append(line)
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == name:
                return event
    raise AssertionError(f"no {name!r} event from the sandbox; output so far: {seen}")


async def test_command_line_logs_id_and_size_but_no_personal_data(tmp_path: Path) -> None:
    directory = tmp_path / "mail"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.sandbox.smtp", "--port", "0", "--dir", str(directory)],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    seen: list[str] = []
    try:
        listening = next_event(proc, "sandbox.listening", seen)
        await aiosmtplib.send(
            letter(supporter="Zoë Müller"),
            hostname="127.0.0.1",
            port=listening["port"],
            sender="bounces@aiusa.example.org",
            recipients=[TARGET],
            local_hostname="localhost",
        )
        event = next_event(proc, "sandbox.message", seen)
        [path] = emls(directory)
        assert event["message_id"] == "<d-0001@aiusa.example.org>"
        # The size of the message as received: the file less our two envelope headers.
        assert event["size"] == len(path.read_bytes().split(b"\r\n", 2)[2])
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    output = "".join(seen) + out.decode() + err.decode()
    for personal in ("Zoë", "Zo\\u00eb", "ller", "zoe.mueller", "example.net", TARGET):
        assert personal not in output
