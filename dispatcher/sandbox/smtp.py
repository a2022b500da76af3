"""The sandbox SMTP server: accepts every letter, relays none, keeps each as a .eml file.

Sandbox mode (the default) points the email channel here whatever the target's address, so
demos and tests exercise the real SMTP path without anything reaching a real office. Each
accepted message is written to ``<dir>/<UTC time>-<Message-ID>.eml`` with two headers added on
top, ``X-Sandbox-Envelope-From`` and ``X-Sandbox-Envelope-To``, because the envelope is what
was really asked for and it need not match the To: header. Files appear atomically (written
under a temporary name, then renamed), so a reader never sees half a message.

Run it with ``python -m dispatcher.sandbox.smtp --port 2525 --dir var/sandbox/mail``.
"""

from __future__ import annotations

import argparse
import asyncio
import email.parser
import email.policy
import logging
import os
import re
import signal
import threading
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from dispatcher.logging import configure as configure_logging
from dispatcher.logging import get_logger

log = get_logger(__name__)

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class LoopbackController(Controller):
    """An aiosmtpd Controller that may be given port 0 and then reports the port it got.

    aiosmtpd 1.4 checks that a started server answers by connecting to the port it was
    given, which for port 0 is not where the server listens (aio-libs/aiosmtpd#388).
    """

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        # Bound to one IP literal, so there is one socket and one port.
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


def _file_ident(message_id: str | None) -> str:
    ident = _UNSAFE_NAME_CHARS.sub("_", (message_id or "").strip().strip("<>")).strip("._")
    return ident[:80] or "no-message-id"


def safe_file_stem(message_id: str | None, when: datetime) -> str:
    """``20240131T120501123456Z-<message id, made safe>``: sorts by arrival, names the letter."""
    return f"{when.astimezone(UTC):%Y%m%dT%H%M%S%fZ}-{_file_ident(message_id)}"


def copies_of(directory: Path, message_id: str) -> list[Path]:
    """The .eml files kept of the letter with this Message-ID (one per try that reached the
    sandbox), as :meth:`MailDirHandler.write` names them."""
    if not directory.is_dir():
        return []
    name = re.compile(r"\d{8}T\d{12}Z-" + re.escape(_file_ident(message_id)) + r"(-\d+)?\.eml")
    return sorted(p for p in directory.iterdir() if name.fullmatch(p.name))


def offer_pipelining(session: Session, hostname: str, responses: list[str]) -> list[str]:
    """An aiosmtpd handler's ``handle_EHLO``: its own answer, with PIPELINING (RFC 2920) before
    the last line. aiosmtpd reads one command after another and answers each in order, so
    commands sent together are served as the RFC asks; the sandbox then takes the same path
    through the email channel as the relays it stands for (Postfix, Exim and the big
    providers all offer it)."""
    session.host_name = hostname  # (aiosmtpd leaves it to a handler that answers EHLO)
    return [*responses[:-1], "250-PIPELINING", responses[-1]]


class MailDirHandler:
    """aiosmtpd handler writing each message to a directory; never relays."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        return offer_pipelining(session, hostname, responses)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        message_id = _message_id(content)
        path = self.write(envelope.mail_from or "", list(envelope.rcpt_tos), content, message_id)
        # Message-ID and size only: addresses and names are personal data.
        log.info("sandbox.message", message_id=message_id, size=len(content))
        # The file name comes back as a queue id, so a sender can find its letter.
        return f"250 2.0.0 Ok: queued as {path.stem}"

    def write(self, mail_from: str, rcpt_tos: list[str], content: bytes, message_id: str | None) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = safe_file_stem(message_id, datetime.now(UTC))
        path = self.directory / f"{stem}.eml"
        counter = 1
        while path.exists():  # a retry of the same delivery within the same microsecond
            path = self.directory / f"{stem}-{counter}.eml"
            counter += 1
        head = (
            b"X-Sandbox-Envelope-From: " + _header_value(mail_from) + b"\r\n"
            b"X-Sandbox-Envelope-To: " + _header_value(", ".join(rcpt_tos)) + b"\r\n"
        )
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_bytes(head + content)
        os.replace(temporary, path)
        return path


class SmtpServerThread:
    """An aiosmtpd server in a thread of its own: ``start()``, ``port``, ``stop()``, and a
    context manager. Subclasses say what the server is (:meth:`_controller`)."""

    #: how errors name the server
    what = "the SMTP server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self._running: LoopbackController | None = None

    def _controller(self) -> LoopbackController:
        raise NotImplementedError

    @property
    def port(self) -> int:
        """The port actually listened on (the one asked for, or the one port 0 got)."""
        if self._running is None:
            raise RuntimeError(f"{self.what} is not running")
        return int(self._running.port)

    def start(self) -> None:
        if self._running is not None:
            raise RuntimeError(f"{self.what} is already running")
        controller = self._controller()
        controller.start()
        self._running = controller

    def stop(self) -> None:
        if self._running is not None:
            self._running.stop()
            self._running = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class SandboxSMTP(SmtpServerThread):
    """The sandbox server in a thread of its own."""

    what = "the sandbox server"

    def __init__(self, directory: Path | str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.directory = Path(directory)

    def _controller(self) -> LoopbackController:
        self.directory.mkdir(parents=True, exist_ok=True)
        return LoopbackController(
            MailDirHandler(self.directory),
            hostname=self.host,
            port=self._requested_port,
            # Skips a reverse DNS lookup per connection (aiosmtpd's default is getfqdn()).
            server_hostname="sandbox.invalid",
            ident="appeal-dispatcher sandbox (never relays)",
        )


def _message_id(content: bytes) -> str | None:
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(content)
    value = headers.get("Message-ID")
    return str(value).strip() if value is not None else None


def _header_value(value: str) -> bytes:
    # Envelope addresses come off SMTP command lines; drop anything that could end a header.
    cleaned = "".join(ch for ch in value if unicodedata.category(ch) not in ("Cc", "Cf"))
    return cleaned.encode("utf-8", "surrogateescape")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher.sandbox.smtp",
        description="Local SMTP sink for sandbox mode: keeps every message as a .eml file.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="IP address to listen on")
    parser.add_argument("--port", type=int, help="port (default: DISPATCH_SANDBOX_SMTP's, 2525)")
    parser.add_argument("--dir", type=Path, help="directory (default: var/sandbox/mail)")
    args = parser.parse_args(argv)

    if args.port is None or args.dir is None:
        from dispatcher.settings import Settings  # only needed for the defaults

        settings = Settings.from_env()
        args.port = settings.sandbox_smtp_port if args.port is None else args.port
        args.dir = settings.sandbox_mail_dir if args.dir is None else args.dir

    configure_logging()
    # aiosmtpd logs envelope addresses at INFO; keep them out of the sandbox's output.
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    stopping = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> Any:
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with SandboxSMTP(args.dir, host=args.host, port=args.port) as sandbox:
        log.info("sandbox.listening", host=sandbox.host, port=sandbox.port, directory=str(args.dir))
        while not stopping.wait(0.5):
            pass
    log.info("sandbox.stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
