"""A real, scriptable SMTP server for tests (aiosmtpd in a thread, 127.0.0.1, a free port).

    with SmtpTestServer() as smtp:
        smtp.script_rcpt([(450, "4.7.1 Greylisted"), (450, "4.7.1 Greylisted")])
        ...  # send through smtp.host / smtp.port
        assert smtp.messages[0].message["Subject"] == "..."
        assert smtp.connections == 1

Scripts answer the next N commands of one verb, across connections, then the server goes
back to accepting: a reply ``(code, text)``, ``DROP`` to close the connection without
answering, or ``HANG`` never to answer. A 421 reply closes the connection after it is sent, as a real server does.
Anything the server accepts is recorded: envelope, raw bytes and the parsed message.

``hold_data(seconds)`` makes the next accepted messages wait that long for their final "250"
*after* they were recorded, like a relay that has queued the message and is slow to say so:
a client that gives up or dies during the hold has still delivered it.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import enum
import ssl
import threading
import time
import warnings
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from types import TracebackType
from typing import Any, TypeAlias

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from dispatcher.channels.email.mime import letter_bytes
from dispatcher.config.models import Section, Sender, SmtpRelay
from dispatcher.sandbox.smtp import LoopbackController, offer_pipelining


class Action(enum.Enum):
    DROP = "drop"
    HANG = "hang"


#: close the connection instead of answering
DROP = Action.DROP
#: never answer, keep the connection open (a relay that stalls; the client's timeout decides)
HANG = Action.HANG

Reply: TypeAlias = "tuple[int, str] | Action"

SCRIPTABLE = ("MAIL", "RCPT", "DATA", "AUTH", "RSET")


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    #: the message as it came over the wire, after dot-unstuffing
    data: bytes
    #: ``data`` parsed with ``email.policy.default``
    message: EmailMessage
    #: the AUTH user name the client logged in as, if it did
    login: str | None
    #: time.monotonic() when the server accepted the message (what a recipient's inbox sees)
    received_at: float = 0.0
    #: time.monotonic() when the server read this transaction's DATA command (before the content)
    data_started_at: float = 0.0


class SmtpTestServer:
    """An SMTP server on 127.0.0.1 that records what it accepts and answers as scripted."""

    def __init__(
        self,
        *,
        auth: Mapping[str, str] | None = None,
        auth_required: bool = False,
        host: str = "127.0.0.1",
        pipelining: bool = False,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """``auth``: user → password accepted by AUTH PLAIN/LOGIN (offered without TLS);
        ``auth_required``: answer 530 to MAIL/RCPT/DATA before a successful AUTH;
        ``pipelining``: say PIPELINING after EHLO (RFC 2920; aiosmtpd reads one command after
        another, so a pipelined group is answered in order either way); ``tls_context``: offer
        STARTTLS with this server context."""
        self.host = host
        self.pipelining = pipelining
        self._tls_context = tls_context
        self._auth = dict(auth) if auth is not None else None
        self._auth_required = auth_required
        self._lock = threading.Lock()
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._holds: deque[float] = deque()
        self._messages: list[ReceivedMessage] = []
        self._commands: list[str] = []
        self._live: set[SMTP] = set()
        self._connections = 0
        self._counting = False
        self._controller: LoopbackController | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SmtpTestServer:
        handler = _Handler(self)
        controller = _Controller(
            self,
            handler,
            hostname=self.host,
            port=0,
            server_hostname="smtp-test.invalid",
            ident="SmtpTestServer",
            authenticator=self._authenticate if self._auth is not None else None,
            auth_require_tls=False,
            auth_required=self._auth_required,
            # Tests want the 8BITMIME/SMTPUTF8-less, plain relay that message.py assumes.
            enable_SMTPUTF8=False,
            tls_context=self._tls_context,
        )
        controller.start()
        self._controller = controller
        # The controller's own readiness probe was a connection too; count from here.
        with self._lock:
            self._counting = True
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._controller is None:
            raise RuntimeError("the test SMTP server is not running")
        return int(self._controller.port)

    # ------------------------------------------------------------------ scripting

    def script(self, command: str, replies: Iterable[Reply]) -> None:
        """Answer the next commands ``command`` (MAIL, RCPT, DATA, AUTH, RSET) with ``replies``."""
        verb = command.upper()
        if verb not in SCRIPTABLE:
            raise ValueError(f"cannot script {command!r}; one of {SCRIPTABLE}")
        with self._lock:
            self._scripts[verb].extend(replies)

    def script_mail(self, replies: Iterable[Reply]) -> None:
        self.script("MAIL", replies)

    def script_rcpt(self, replies: Iterable[Reply]) -> None:
        self.script("RCPT", replies)

    def script_data(self, replies: Iterable[Reply]) -> None:
        """Replies to the end of DATA (after the message was received, as real servers do)."""
        self.script("DATA", replies)

    def script_auth(self, replies: Iterable[Reply]) -> None:
        self.script("AUTH", replies)

    def hold_data(self, seconds: float, count: int = 1) -> None:
        """Record each of the next ``count`` messages at once, then wait ``seconds`` before
        answering its DATA with 250 (a scripted DATA reply takes precedence and is not held)."""
        with self._lock:
            self._holds.extend([seconds] * count)

    def _next_hold(self) -> float | None:
        with self._lock:
            return self._holds.popleft() if self._holds else None

    def pending_script(self, command: str) -> int:
        with self._lock:
            return len(self._scripts[command.upper()])

    # ------------------------------------------------------------------ observations

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def commands(self) -> list[str]:
        """Verbs seen, in order: AUTH, MAIL, RCPT, DATA, RSET, QUIT (not EHLO)."""
        with self._lock:
            return list(self._commands)

    @property
    def connections(self) -> int:
        """Connections accepted since start (or the last ``reset()``)."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._live)

    def reset(self) -> None:
        """Forget messages, commands, counters and unused scripts."""
        with self._lock:
            self._messages.clear()
            self._commands.clear()
            self._scripts.clear()
            self._holds.clear()
            self._connections = 0

    def drop_connections(self, timeout: float = 2.0) -> None:
        """Close every open connection from the server side (an idle timeout, a restart)."""
        assert self._controller is not None
        loop = self._controller.loop

        def close_all() -> None:
            for protocol in list(self._live):
                if protocol.transport is not None:
                    protocol.transport.close()

        loop.call_soon_threadsafe(close_all)
        self.wait_for(lambda: self.open_connections == 0, timeout)

    @staticmethod
    def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
        """Poll ``predicate`` until true; for effects that land after the client moved on.
        Blocks the calling thread: from a coroutine whose loop must progress, use ``until``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout:.1f} s")
            time.sleep(0.005)

    @staticmethod
    async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
        """``wait_for`` for coroutines: lets the event loop run while polling."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout:.1f} s")
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ server side

    def _next_reply(self, verb: str) -> Reply | None:
        with self._lock:
            self._commands.append(verb)
            queue = self._scripts.get(verb)
            return queue.popleft() if queue else None

    def _record(self, envelope: Envelope, session: Session, data_started_at: float = 0.0) -> int:
        data = envelope.original_content or b""
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        auth = session.auth_data
        with self._lock:
            self._messages.append(
                ReceivedMessage(
                    mail_from=envelope.mail_from or "",
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    data=data,
                    message=parsed,
                    login=auth.login.decode() if isinstance(auth, LoginPassword) else None,
                    received_at=time.monotonic(),
                    data_started_at=data_started_at,
                )
            )
            return len(self._messages)

    def _opened(self, protocol: SMTP) -> None:
        with self._lock:
            if self._counting:
                self._connections += 1
            self._live.add(protocol)

    def _closed(self, protocol: SMTP) -> None:
        with self._lock:
            self._live.discard(protocol)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        scripted = self._next_reply("AUTH")
        if isinstance(scripted, tuple):
            code, text = scripted
            return AuthResult(success=False, handled=False, message=f"{code} {text}")
        assert self._auth is not None
        ok = isinstance(data, LoginPassword) and self._auth.get(data.login.decode()) == data.password.decode()
        # handled=False makes aiosmtpd send its own "535 5.7.8" on failure.
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


class _CountingSMTP(SMTP):
    def __init__(self, owner: SmtpTestServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._owner._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._owner._closed(self)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        self.data_started_at = time.monotonic()
        await super().smtp_DATA(arg)


class _Controller(LoopbackController):
    def __init__(self, owner: SmtpTestServer, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._owner = owner

    def factory(self) -> SMTP:
        with warnings.catch_warnings():
            # "Requiring AUTH while not requiring TLS": deliberate, this is a test server.
            warnings.simplefilter("ignore")
            return _CountingSMTP(self._owner, self.handler, **self.SMTP_kwargs)


class _Handler:
    def __init__(self, owner: SmtpTestServer) -> None:
        self.owner = owner

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        if self.owner.pipelining:
            return offer_pipelining(session, hostname, responses)
        session.host_name = hostname  # (aiosmtpd leaves it to a handler that answers EHLO)
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = await self._scripted(server, "MAIL")
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = await self._scripted(server, "RCPT")
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await self._scripted(server, "DATA")
        if reply is not None:
            return reply
        number = self.owner._record(envelope, session, getattr(server, "data_started_at", 0.0))
        hold = self.owner._next_hold()
        if hold is not None:
            await asyncio.sleep(hold)
        return f"250 2.0.0 Ok: queued as TEST{number:04d}"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await self._scripted(server, "RSET")
        return reply if reply is not None else "250 2.0.0 Ok"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.owner._next_reply("QUIT")
        return "221 2.0.0 Bye"

    async def _scripted(self, server: SMTP, verb: str) -> str | None:
        reply = self.owner._next_reply(verb)
        if reply is None:
            return None
        assert server.transport is not None
        if reply is DROP:
            server.transport.close()
            # Never answer: connection_lost() cancels this handler task.
            await asyncio.get_running_loop().create_future()
        if reply is HANG:
            # Never answer; the connection stays open until the client gives up and closes it.
            await asyncio.get_running_loop().create_future()
        assert isinstance(reply, tuple)
        code, text = reply
        if code == 421:
            # Closed on the next loop turn, after aiosmtpd has written the reply.
            server.loop.call_soon(server.transport.close)
        return f"{code} {text}"


def make_section(
    *,
    code: str = "us",
    relay: SmtpRelay | None = None,
    sender_name: str = "Amnesty International USA",
    sender_address: str = "appeals@aiusa.example.org",
    envelope: str | None = "bounces@aiusa.example.org",
) -> Section:
    """A Section built directly (no config files), by default with a relay nobody listens on:
    192.0.2.0/24 is TEST-NET-1, reserved for documentation, never routed."""
    return Section(
        code=code,
        name=sender_name,
        country="US",
        timezone="America/New_York",
        languages=["en"],
        intake_key_env="TEST_INTAKE_KEY",
        sender=Sender(name=sender_name, address=sender_address, envelope=envelope),
        smtp=relay or SmtpRelay(host="192.0.2.25", port=587),
    )


def french_letter_bytes(*, text: str, html: str, to_address: str, delivery_id: str = "d-1") -> bytes:
    """The bytes the worker would send for a French letter of ``make_section()``'s section with
    this ``text`` and ``html`` (non-ASCII throughout, so quoted-printable), dated 2024-03-05."""
    return letter_bytes(
        delivery_id=delivery_id,
        section=make_section(),
        to_name="Ambassador Jane Smith",
        to_address=to_address,
        supporter_name="Zoë Martín",
        supporter_email="zoe@example.net",
        subject="Libérez les militants détenus",
        text=text,
        html=html,
        language="fr",
        date=datetime(2024, 3, 5, 14, 30, tzinfo=UTC),
    )


@pytest.fixture
def smtp_server() -> Iterator[SmtpTestServer]:
    """A running SmtpTestServer; use ``pytest_plugins = ("tests.support.smtp",)`` to get it."""
    with SmtpTestServer() as server:
        yield server
