"""A small pool of SMTP connections to one relay, shared by a worker's threads.

Why pool: a worker sends thousands of short letters to the same relay; a TCP + TLS + AUTH
handshake per letter costs more than the letter, and relays rate-limit connection churn.

Why blocking sockets in the worker's own threads (the standard library's smtplib for the
connection, this module for the transaction) and not aiosmtplib on the process's event loop:
the worker's CPU per letter is what issue 11 measures, and every hand-off between a worker
thread and the loop thread, and every turn of the loop for a reply, cost more than the SMTP
itself. bench/worker_send_cost.py measured 215 µs a letter through the loop against 48 with
blocking sockets; the whole worker's CPU per letter fell by a fifth (docs/benchmarks.md).

How it works:

* At most ``size`` connections exist: a semaphore bounds the sends in flight, and a new
  connection is opened only when no idle one is left, so idle + busy never exceeds ``size``.
* Idle connections are kept last-in first-out, so a quiet period lets the coldest ones reach
  ``idle_timeout`` (a reaper thread then closes them with QUIT) while busy periods reuse warm
  ones. A connection idle for longer is never reused, whether the reaper has been or not.
* A connection is retired (QUIT) after ``max_messages_per_connection`` transactions.
* A refused transaction (4xx/5xx on MAIL, RCPT or DATA) is followed by RSET and the
  connection goes back to the pool; after a 421, a failed RSET, a disconnect, a timeout, a
  reply that is not SMTP or any error we do not understand it is dropped, because its state is
  unknown.
* A reused connection that turns out dead before MAIL FROM was accepted (the relay closed
  it while it sat idle) is replaced by a fresh one and the message tried once more: nothing
  of it had reached the relay, so this cannot duplicate a letter.
* One message goes to all its recipients or to none: the first refused RCPT aborts the
  transaction (RSET) before the message.
* A relay that offers PIPELINING (RFC 2920) gets MAIL, RCPT and DATA in one write: two round
  trips a letter instead of four. DATA is then already sent when MAIL or RCPT is refused; a
  relay that follows the RFC refuses that DATA too and RSET puts the connection right. One that
  answers 354 all the same would take whatever came next as the message, so that connection is
  closed without sending anything: nothing is delivered, to nobody.
* A caller may pass a ``window`` (dispatcher/queue/window.py): it is acquired just before DATA
  (pipelined, DATA went with the envelope: then once DATA has its 354, just before the message,
  whose closing dot is what the relay accepts), and released here only if the message is not
  accepted; after a 250 the caller releases it once the letter is recorded as sent.
* A ``deadline`` bounds the whole send, waits for a connection and for the window included:
  when it passes, TimeoutError is raised (not a classified error: the caller gave the send that
  long) and a connection in the middle of a transaction is dropped.

Errors are aiosmtplib's classes (translated from smtplib's where the library raised them), so
classify.py stays the one place that maps what a relay did onto the delivery classes.
"""

from __future__ import annotations

import contextlib
import functools
import select
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Literal, Protocol

import aiosmtplib
from aiosmtplib import SMTPStatus
from aiosmtplib.email import flatten_message, parse_address
from aiosmtplib.protocol import normalize_message_line_endings

from dispatcher.channels.email.classify import Stage, classify
from dispatcher.config.models import SmtpRelay
from dispatcher.errors import DispatchError, OperationalError, PermanentError
from dispatcher.logging import get_logger

log = get_logger(__name__)

TlsMode = Literal["starttls", "implicit", "none"]

# A polite QUIT when retiring a connection must not hold up a worker thread or shutdown.
_QUIT_TIMEOUT = 2.0

# What a connection raises for transport trouble; anything else is a bug and propagates as is.
_SMTP_FAILURES = (aiosmtplib.SMTPException, smtplib.SMTPException, OSError)


class DataWindow(Protocol):
    """What a transaction needs of dispatcher.queue.window.WindowTicket."""

    def acquire(self, timeout: float | None = None) -> None: ...

    def release(self) -> None: ...


@dataclass
class PoolStats:
    """Counters for tests and metrics; they only ever grow."""

    connections_opened: int = 0
    connections_closed: int = 0
    #: messages the relay accepted (250 after DATA)
    messages_sent: int = 0
    #: messages moved to a fresh connection because their reused one was found dead
    stale_retries: int = 0
    #: transactions sent with PIPELINING (MAIL, RCPT and DATA in one write), accepted or not
    pipelined: int = 0


@dataclass(eq=False)
class _Connection:
    smtp: smtplib.SMTP
    sock: socket.socket
    last_used: float
    pipelining: bool
    #: MAIL FROM commands issued, accepted or not: what recycling counts
    transactions: int = 0
    #: the socket's timeout now (shortened near a deadline)
    timeout: float = 0.0
    closed: bool = False


class SmtpPool:
    """Connections to one relay, shared by every thread sending through it."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: TlsMode = "starttls",
        username: str | None = None,
        password: str | None = None,
        size: int = 4,
        max_messages_per_connection: int = 100,
        idle_timeout: float = 30.0,
        timeout: float = 30.0,
        local_hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if size < 1 or max_messages_per_connection < 1:
            raise ValueError("size and max_messages_per_connection must be at least 1")
        self.host = host
        self.port = port
        self.tls: TlsMode = tls
        self.size = size
        self.max_messages_per_connection = max_messages_per_connection
        self.idle_timeout = idle_timeout
        self.timeout = timeout
        self.stats = PoolStats()
        self._username = username
        self._password = password
        self._local_hostname = local_hostname
        # smtplib's own default context verifies nothing; aiosmtplib's (and ours) does.
        self._tls_context = tls_context
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._reaper_wake = threading.Condition(self._lock)
        self._reaper: threading.Thread | None = None
        self._idle: list[_Connection] = []
        self._closed = False

    @classmethod
    def for_relay(
        cls,
        relay: SmtpRelay,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> SmtpPool:
        """A pool for ``relay``, saying EHLO with its ``ehlo_name`` (None: our host name)."""
        return cls(
            relay.host,
            relay.port,
            tls=relay.tls,
            username=username,
            password=password,
            size=relay.pool_size,
            max_messages_per_connection=relay.max_messages_per_connection,
            idle_timeout=relay.idle_timeout,
            timeout=relay.timeout,
            local_hostname=relay.ehlo_name,
            tls_context=tls_context,
        )

    def __repr__(self) -> str:
        return f"<SmtpPool {self.host}:{self.port} tls={self.tls} size={self.size}>"

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def send(
        self,
        message: bytes | EmailMessage,
        sender: str,
        recipients: Sequence[str],
        *,
        window: DataWindow | None = None,
        deadline: float | None = None,
    ) -> tuple[int, str]:
        """Send ``message`` in one transaction; the final reply's code and text on success.

        ``message``: the bytes to send as they are (CRLF line ends; the channel's, DKIM-signed),
        or an EmailMessage, serialised here.

        ``window``, if given, is acquired just before the message and still held when this
        returns (see the module's docstring); on any failure it is released before the error is
        raised. ``deadline``: a ``time.monotonic()`` by which the send is given up.

        Raises a classified DeliveryError (see classify.py) for anything the relay or the
        network did, TimeoutError when the deadline passed; other exceptions are bugs and
        propagate unchanged.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if _past(deadline):
            raise TimeoutError("the send's deadline passed")
        if isinstance(recipients, str) or not recipients:
            raise ValueError("recipients must be a non-empty sequence of addresses")
        _check_address(sender, "envelope sender", OperationalError)
        for recipient in recipients:
            _check_address(recipient, "recipient", PermanentError)
        # flatten_message also drops any Bcc header
        data = message if isinstance(message, bytes) else flatten_message(message)

        if not self._slots.acquire(timeout=_remaining(deadline, default=None)):
            raise TimeoutError("timed out waiting for a connection to the relay")
        try:
            conn, reused = self._checkout(deadline)
            while True:
                try:
                    code, text = self._transact(conn, data, sender, recipients, window, deadline)
                except _StaleConnection as stale:
                    if not reused:
                        raise classify(stale.cause, "mail") from stale.cause
                    # Only a reused connection can be stale; its replacement is not retried.
                    with self._lock:
                        self.stats.stale_retries += 1
                    conn, reused = self._open(deadline), False
                    continue
                with self._lock:
                    self.stats.messages_sent += 1
                return code, text
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close idle connections (QUIT); busy ones are retired as their sends finish."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._reaper_wake.notify()
        for conn in idle:
            self._quit(conn)

    # ------------------------------------------------------------------ one transaction

    def _transact(
        self,
        conn: _Connection,
        data: bytes,
        sender: str,
        recipients: Sequence[str],
        window: DataWindow | None,
        deadline: float | None,
    ) -> tuple[int, str]:
        stage: Stage = "mail"
        conn.transactions += 1
        entered = accepted = False
        try:
            mail = b" ".join((b"MAIL FROM:<" + sender.encode("ascii") + b">", *self._mail_options(conn, data)))
            envelope: list[tuple[Stage, bytes, str]] = [("mail", mail, sender)]
            envelope += [("rcpt", b"RCPT TO:<" + r.encode("ascii") + b">", r) for r in recipients]
            pipelined = conn.pipelining
            if pipelined:
                with self._lock:
                    self.stats.pipelined += 1
                self._write(conn, b"\r\n".join([command for _, command, _ in envelope] + [b"DATA\r\n"]), deadline)
            # Pipelined, every reply is read, refused or not, so that the connection stays in
            # step; one command at a time, the first refusal ends the transaction.
            refusal: aiosmtplib.SMTPResponseException | None = None
            for stage, command, address in envelope:
                if not pipelined:
                    self._write(conn, command + b"\r\n", deadline)
                code, text = self._reply(conn, deadline)
                if refusal is None and stage == "mail" and code != SMTPStatus.completed:
                    refusal = aiosmtplib.SMTPSenderRefused(code, text, address)
                elif refusal is None and code not in (SMTPStatus.completed, SMTPStatus.will_forward):
                    refusal = aiosmtplib.SMTPRecipientRefused(code, text, address)
                if refusal is not None and not pipelined:
                    raise refusal
            stage = "data"
            if not pipelined:
                if window is not None:
                    # From DATA on, the relay may accept the letter. (Waiting for the window
                    # has no relay timeout: only the deadline bounds it.)
                    _enter(window, deadline)
                    entered = True
                self._write(conn, b"DATA\r\n", deadline)
            code, text = self._reply(conn, deadline)
            if refusal is not None:
                if code == SMTPStatus.start_input:
                    # It waits for a message we will not send: whatever came next would be one.
                    self._drop(conn, "354 after a refusal")
                raise refusal  # (its class says which command was refused: classify.py)
            if code != SMTPStatus.start_input:
                raise aiosmtplib.SMTPDataError(code, text)
            if window is not None and not entered:
                # Pipelined, DATA went with the envelope: the message's closing dot is the step.
                _enter(window, deadline)
                entered = True
            self._write(conn, wire_data(data) or _repaired_wire(data), deadline)
            code, text = self._reply(conn, deadline)
            if code != SMTPStatus.completed:
                raise aiosmtplib.SMTPDataError(code, text)
            accepted = True
        except _DeadlinePassed as exc:
            self._drop(conn, "deadline")
            raise TimeoutError("the send's deadline passed") from exc
        except _RelayTimedOut as exc:
            # The relay did not answer in time: a connection whose next reply nobody could pair
            # with its command is closed.
            self._drop(conn, "timeout")
            raise classify(aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"), stage) from exc
        except aiosmtplib.SMTPServerDisconnected as exc:
            self._drop(conn, "disconnected")
            if stage == "mail":
                raise _StaleConnection(exc) from exc
            raise classify(exc, stage) from exc
        except aiosmtplib.SMTPResponseException as exc:
            error = classify(exc, stage)
            self._after_refusal(conn, exc, deadline)
            raise error from exc
        except _SMTP_FAILURES as exc:
            self._drop(conn, type(exc).__name__)
            raise classify(exc, stage) from exc
        except BaseException:
            # Given up on (the window's wait timed out, the ticket was closed) or a bug,
            # possibly mid-message: nobody knows what the relay has seen.
            self._drop(conn, "interrupted")
            raise
        finally:
            if entered and not accepted and window is not None:
                # No 250: the letter is recorded as refused or retried, not as sent.
                window.release()
        self._checkin(conn)
        return code, text

    def _mail_options(self, conn: _Connection, data: bytes) -> list[bytes]:
        options: list[bytes] = []
        if conn.smtp.has_extn("size"):
            # Lets the relay refuse an oversized letter before we upload it.
            options.append(b"SIZE=%d" % len(data))
        if not data.isascii() and conn.smtp.has_extn("8bitmime"):
            # Our own messages are 7-bit (message.py); this is for anything else.
            options.append(b"BODY=8BITMIME")
        return options

    def _after_refusal(self, conn: _Connection, exc: aiosmtplib.SMTPResponseException, deadline: float | None) -> None:
        if conn.closed or exc.code == 421 or exc.code < 0:
            # closing, or the relay says what is not SMTP: out of step
            self._drop(conn, f"reply {exc.code}")
            return
        try:
            self._write(conn, b"RSET\r\n", deadline)
            code, _ = self._reply(conn, deadline)
        except (*_SMTP_FAILURES, _RelayTimedOut, _DeadlinePassed):
            self._drop(conn, "RSET failed")
            return
        except BaseException:
            self._drop(conn, "interrupted")
            raise
        if code != SMTPStatus.completed:
            self._drop(conn, f"RSET answered {code}")
            return
        self._checkin(conn)

    # ------------------------------------------------------------------ the wire

    def _arm(self, conn: _Connection, deadline: float | None) -> None:
        """The socket's timeout for the next read or write: the relay's, or less near the deadline."""
        timeout = self.timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _DeadlinePassed
            timeout = min(timeout, left)
        if timeout != conn.timeout:
            conn.sock.settimeout(timeout)
            conn.timeout = timeout

    def _write(self, conn: _Connection, data: bytes, deadline: float | None) -> None:
        self._arm(conn, deadline)
        try:
            conn.sock.sendall(data)
        except TimeoutError as exc:
            raise _too_slow(deadline) from exc
        except OSError as exc:
            raise aiosmtplib.SMTPServerDisconnected(f"Connection lost: {exc}") from exc

    def _reply(self, conn: _Connection, deadline: float | None) -> tuple[int, str]:
        self._arm(conn, deadline)
        try:
            return read_reply(conn.smtp)
        except smtplib.SMTPServerDisconnected as exc:
            if isinstance(exc.__context__, TimeoutError):
                raise _too_slow(deadline) from exc.__context__
            raise aiosmtplib.SMTPServerDisconnected(str(exc)) from exc.__context__

    # ------------------------------------------------------------------ connections

    def _checkout(self, deadline: float | None) -> tuple[_Connection, bool]:
        """A connection for one transaction, and whether it was reused from the pool."""
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn = self._idle.pop()
            if time.monotonic() - conn.last_used < self.idle_timeout and _quiet(conn.sock):
                return conn, True
            # (a relay that closed it, or said 421 first, while it sat idle)
            self._drop(conn, "expired or closed while idle")
        return self._open(deadline), False

    def _open(self, deadline: float | None) -> _Connection:
        timeout = self.timeout
        if deadline is not None:
            timeout = min(timeout, max(deadline - time.monotonic(), 0.001))
        try:
            # (connected by the constructor: only it tells smtplib the name TLS is to verify)
            if self.tls == "implicit":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    self.host, self.port, self._local_hostname, timeout=timeout, context=self._verifying_context()
                )
            else:
                smtp = smtplib.SMTP(self.host, self.port, self._local_hostname, timeout=timeout)
        except smtplib.SMTPConnectError as exc:  # a greeting other than 220
            refused = aiosmtplib.SMTPConnectResponseError(exc.smtp_code, _text(exc.smtp_error))
            raise classify(refused, "connect") from exc
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            cause = exc.__context__ if isinstance(exc, smtplib.SMTPServerDisconnected) else exc
            kind = (
                aiosmtplib.SMTPConnectTimeoutError if isinstance(cause, TimeoutError) else aiosmtplib.SMTPConnectError
            )
            error = kind(f"Error connecting to {self.host} on port {self.port}: {cause or exc}")
            error.__cause__ = cause or exc  # (classify.py reads a TLS failure or an unknown host there)
            raise classify(error, "connect") from error
        try:
            self._ehlo(smtp)
            if self.tls == "starttls":
                # Mandatory: a relay that does not offer it is refused rather than used in clear.
                smtp.starttls(context=self._verifying_context())
                self._ehlo(smtp)
            if self._username is not None and self._password is not None:
                smtp.login(self._username, self._password)
        except BaseException as exc:
            smtp.close()
            if isinstance(exc, _SMTP_FAILURES):
                raise classify(_library_error(exc), "connect") from exc
            raise
        assert smtp.sock is not None
        with self._lock:
            self.stats.connections_opened += 1
        log.debug("smtp.connection_opened", relay=f"{self.host}:{self.port}")
        return _Connection(
            smtp=smtp,
            sock=smtp.sock,
            last_used=time.monotonic(),
            pipelining=smtp.has_extn("pipelining"),
            timeout=timeout,
        )

    def _ehlo(self, smtp: smtplib.SMTP) -> None:
        # Here rather than lazily at MAIL FROM, so a refused EHLO is a connect-stage failure
        # (the relay refuses us), not a refused sender.
        code, text = smtp.ehlo()
        if code != SMTPStatus.completed:
            raise aiosmtplib.SMTPHeloError(code, _text(text))

    def _verifying_context(self) -> ssl.SSLContext:
        return self._tls_context or _default_context()

    def _checkin(self, conn: _Connection) -> None:
        if conn.closed:
            return
        with self._lock:
            keep = not self._closed and conn.transactions < self.max_messages_per_connection
            if keep:
                conn.last_used = time.monotonic()
                self._idle.append(conn)
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, name=f"smtp-reaper-{self.port}", daemon=True)
                    self._reaper.start()
        if not keep:
            self._quit(conn)

    def _reap(self) -> None:
        """Close connections idle for ``idle_timeout`` (the reaper thread, one per pool).

        It sleeps until the oldest idle connection's time is up, or ``idle_timeout`` when none
        is idle, rather than being woken by every check-in: a connection so gets closed between
        ``idle_timeout`` and twice that after its last use, and a send never pays for a wake."""
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                expired = [c for c in self._idle if now - c.last_used >= self.idle_timeout]
                for conn in expired:
                    self._idle.remove(conn)
                if not expired:
                    oldest = min((c.last_used for c in self._idle), default=now)
                    self._reaper_wake.wait(oldest + self.idle_timeout - now)
                    continue
            for conn in expired:
                self._quit(conn)

    def _quit(self, conn: _Connection) -> None:
        """Close politely (QUIT, its reply awaited for a moment)."""
        if not conn.closed:
            with contextlib.suppress(*_SMTP_FAILURES):
                conn.sock.settimeout(min(self.timeout, _QUIT_TIMEOUT))
                conn.sock.sendall(b"QUIT\r\n")
                conn.smtp.getreply()
        self._drop(conn, None)

    def _drop(self, conn: _Connection, reason: str | None) -> None:
        """Close at once, without QUIT; safe to call twice."""
        with self._lock:
            if conn.closed:
                return
            conn.closed = True
            self.stats.connections_closed += 1
        conn.smtp.close()
        if reason is not None:
            log.debug("smtp.connection_dropped", relay=f"{self.host}:{self.port}", reason=reason)


def read_reply(smtp: smtplib.SMTP) -> tuple[int, str]:
    """The next reply on ``smtp``'s connection, read from its buffer when it came with others
    (PIPELINING): code and text as aiosmtplib reads them. A reply that is not SMTP raises
    aiosmtplib.SMTPResponseException (-1); a lost connection, smtplib.SMTPServerDisconnected
    (its context says why: a TimeoutError when the relay was too slow)."""
    try:
        code, text = smtp.getreply()
    except smtplib.SMTPResponseException as exc:  # a line too long
        raise aiosmtplib.SMTPResponseException(SMTPStatus.invalid_response, _text(exc.smtp_error)) from None
    if code < 0:
        raise aiosmtplib.SMTPResponseException(
            SMTPStatus.invalid_response, f"Malformed SMTP response line: {_text(text)}"
        )
    # (aiosmtplib joins a reply's lines leaving out empty ones before the first with text)
    return code, _text(text.lstrip(b"\n"))


def wire_data(data: bytes) -> bytes | None:
    """What goes after DATA for ``data`` (line ends made CRLF, a final CRLF, each line's leading
    dot doubled, the closing dot), when every line of ``data`` already ends in CRLF; None
    otherwise. The same bytes aiosmtplib's ``data()`` sends, without its two regular
    expressions over the whole message: byte counts check the line ends, bytes.replace stuffs
    the dots (a fifth of the worker path's instructions per letter, callgrind)."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        return None  # a lone CR or LF: made CRLF by _repaired_wire
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    stuffed = data.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def _repaired_wire(data: bytes) -> bytes:
    """:func:`wire_data` of a message with lone CRs or LFs, made CRLF as aiosmtplib makes them."""
    wire = wire_data(normalize_message_line_endings(data))
    assert wire is not None
    return wire


def _enter(window: DataWindow, deadline: float | None) -> None:
    try:
        window.acquire(_remaining(deadline, default=None))
    except TimeoutError as exc:  # (an OSError: not to be taken for the relay's)
        raise _DeadlinePassed from exc


def _remaining(deadline: float | None, *, default: float | None) -> float | None:
    """Seconds to ``deadline`` (never negative), or ``default`` without one."""
    return default if deadline is None else max(deadline - time.monotonic(), 0.0)


def _quiet(sock: socket.socket) -> bool:
    """Nothing to read on an idle connection: neither an EOF nor a reply nobody asked for."""
    try:
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):  # (closed: no file descriptor any more)
        return False


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _too_slow(deadline: float | None) -> DispatchError:
    """A read or write timed out: the deadline passed, or else the relay was too slow."""
    return _DeadlinePassed() if _past(deadline) else _RelayTimedOut()


@functools.lru_cache(maxsize=1)
def _default_context() -> ssl.SSLContext:
    # The system's CAs, hostname checked; made once (reading the bundle costs milliseconds).
    return ssl.create_default_context()


def _text(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")


def _library_error(exc: BaseException) -> BaseException:
    """aiosmtplib's class for an error smtplib raised, so classify.py reads both alike."""
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return aiosmtplib.SMTPAuthenticationError(exc.smtp_code, _text(exc.smtp_error))
    if isinstance(exc, smtplib.SMTPResponseException):
        return aiosmtplib.SMTPResponseException(exc.smtp_code, _text(exc.smtp_error))
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        error = aiosmtplib.SMTPServerDisconnected(str(exc) or "Connection lost")
        error.__cause__ = exc.__context__  # (a TLS failure shows in the chain: classify.py)
        return error
    if isinstance(exc, smtplib.SMTPException):
        # STARTTLS or AUTH not offered
        return aiosmtplib.SMTPException(str(exc))
    return exc


class _DeadlinePassed(DispatchError):
    """The send's deadline passed before or while talking to the relay."""


class _RelayTimedOut(DispatchError):
    """The relay took longer than its timeout to take or answer a command."""


class _StaleConnection(DispatchError):
    """The connection died before MAIL FROM was accepted: nothing reached the relay."""

    def __init__(self, cause: aiosmtplib.SMTPServerDisconnected) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _check_address(address: str, what: str, error: type[PermanentError | OperationalError]) -> None:
    # Checked before taking a connection, so a bad address never costs a transaction. Strict:
    # a bare address, nothing that could add to the command line ("a@b.org> NOTIFY=NEVER").
    if not address.isascii():
        raise error(f"{what} is not ASCII (SMTPUTF8 is not used)")
    if not _is_bare_address(address):
        raise error(f"{what} is not a bare address that can go on an SMTP command line")


@functools.lru_cache(maxsize=4096)
def _is_bare_address(address: str) -> bool:
    # Cached: a target's address and the envelope sender come back letter after letter, and
    # parseaddr is pure Python.
    try:
        parsed = parse_address(address)
    except ValueError:
        parsed = None
    return parsed == address and "@" in address
