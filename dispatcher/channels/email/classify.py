"""Map what went wrong talking SMTP onto the outcome classes of DESIGN.md.

The remote code and text are kept as they were sent ("550" / "5.1.1 <x@y>: unknown user"), so
the ledger and the operator console show what the relay actually said, extended status
code included.

| what happened                                       | class                   |
| --------------------------------------------------- | ----------------------- |
| 421 anywhere (the server is closing the connection) | TransientError          |
| other 4xx                                           | TransientError          |
| 5xx on RCPT or DATA                                 | Bounced (PermanentError)|
| 5xx on MAIL FROM (the relay refuses our sender)     | OperationalError        |
| 5xx on the greeting, EHLO, STARTTLS                 | OperationalError        |
| authentication failed, 530/534/535/538              | OperationalError        |
| TLS failure, STARTTLS or AUTH not offered           | OperationalError        |
| refused, reset, timed out, disconnected             | BlipError               |
"""

from __future__ import annotations

import re
import socket
import ssl
from typing import Literal

import aiosmtplib

from dispatcher.channels.email.bounces import BounceKind, classify_reply, reply_status, suppresses_address
from dispatcher.errors import (
    BlipError,
    Bounced,
    DeliveryError,
    OperationalError,
    PermanentError,
    TransientError,
)

#: where in the SMTP conversation an error happened, when the exception type does not say
Stage = Literal["connect", "mail", "rcpt", "data", "rset"]

#: "authentication required / too weak / failed / encryption required": our credentials
AUTH_CODES = frozenset({530, 534, 535, 538})

_SECONDS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1}
_SECONDS |= {"m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60}
# Greylisting hints: "try again in 300 seconds", "please come back in 00:05:00".
_WAIT_UNITS = re.compile(r"\b(?:in|after)\s+(\d{1,5})\s*([a-z]+)\b", re.IGNORECASE)
_WAIT_CLOCK = re.compile(r"\b(?:in|after)\s+(\d{1,2}):(\d{2}):(\d{2})\b")
_NO_SUCH_HOST = frozenset({socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)})


def classify(exc: BaseException, stage: Stage | None = None) -> DeliveryError:
    """The DeliveryError for ``exc``; ``stage`` names the command the pool was running."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # All recipients refused: the most serious refusal decides (one bad address makes
        # the whole all-or-nothing transaction impossible, a bad login stops everything).
        refusals = [classify(r, "rcpt") for r in exc.recipients]
        return max(refusals, key=_severity) if refusals else TransientError("no recipient accepted")
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return OperationalError(f"authentication failed: {exc.message}", code=exc.code)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _from_reply(exc, stage)
    if _tls_failure(exc):
        return OperationalError(f"TLS failed: {_text(exc)}")
    if isinstance(exc, aiosmtplib.SMTPConnectError) and _unknown_host(exc):
        return OperationalError(f"relay host not found: {_text(exc)}")
    if isinstance(exc, (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, TimeoutError, OSError)):
        where = f" during {stage.upper()}" if stage and stage != "connect" else ""
        return BlipError(f"{_text(exc)}{where}")
    if isinstance(exc, aiosmtplib.SMTPException):
        # STARTTLS required but not offered, AUTH not offered, SMTPUTF8 missing: the relay
        # is not the one we were configured for.
        return OperationalError(f"relay cannot be used as configured: {_text(exc)}")
    return OperationalError(f"unexpected {type(exc).__name__}: {exc}")


def retry_after_hint(text: str) -> float | None:
    """Seconds a 4xx reply asks us to wait, when it says so in a form we recognise."""
    if match := _WAIT_CLOCK.search(text):
        hours, minutes, seconds = (int(g) for g in match.groups())
        return float(hours * 3600 + minutes * 60 + seconds)
    for match in _WAIT_UNITS.finditer(text):
        unit = _SECONDS.get(match.group(2).lower())
        if unit is not None:
            return float(int(match.group(1)) * unit)
    return None


def _from_reply(exc: aiosmtplib.SMTPResponseException, stage: Stage | None) -> DeliveryError:
    code, text = exc.code, exc.message
    if code in AUTH_CODES:
        return OperationalError(text, code=code)
    if 400 <= code < 500:
        return TransientError(text, code=code, retry_after=retry_after_hint(text))
    if 500 <= code < 600:
        if isinstance(exc, aiosmtplib.SMTPSenderRefused) or stage == "mail":
            return OperationalError(text, code=code)
        at_rcpt = isinstance(exc, aiosmtplib.SMTPRecipientRefused) or stage == "rcpt"
        if at_rcpt or isinstance(exc, aiosmtplib.SMTPDataError) or stage == "data":
            if classify_reply(code, text) is BounceKind.SOFT:
                # a full mailbox (5.2.2, 552): persistent by RFC 3463, emptied in practice
                return TransientError(text, code=code, retry_after=retry_after_hint(text))
            return Bounced(text, code=code, suppress=refuses_address(text, at_rcpt=at_rcpt))
        # Greeting, EHLO, STARTTLS, RSET: a refusal that has nothing to do with the letter.
        return OperationalError(text, code=code)
    # A malformed or out-of-place reply (aiosmtplib reports those as -1): the conversation
    # is out of step; a fresh connection later is the remedy.
    return TransientError(f"unexpected reply: {text}", code=code)


def refuses_address(text: str, *, at_rcpt: bool) -> bool:
    """Whether a 5xx reply refuses the address itself (suppress it for every letter) rather
    than this letter or its sender: with an enhanced status, the bounce reader's rule (only
    5.1.x: :func:`dispatcher.channels.email.bounces.suppresses_address`); without one, a
    refusal at RCPT is about the address and one at DATA is not."""
    status = reply_status(text)
    if status is None:
        return at_rcpt
    return suppresses_address(status)


def _severity(error: DeliveryError) -> int:
    order = (BlipError, TransientError, PermanentError, OperationalError)
    return max(i for i, cls in enumerate(order) if isinstance(error, cls))


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _tls_failure(exc: BaseException) -> bool:
    # aiosmtplib wraps a failed implicit-TLS handshake in SMTPConnectError (ssl.SSLError is an
    # OSError) and lets a failed STARTTLS handshake through as it is: look at the whole chain.
    return any(isinstance(e, (ssl.SSLError, ssl.CertificateError)) for e in _causes(exc))


def _unknown_host(exc: BaseException) -> bool:
    # A misspelt relay name will not fix itself; a DNS hiccup (EAI_AGAIN) might.
    return any(isinstance(e, socket.gaierror) and e.errno in _NO_SUCH_HOST for e in _causes(exc))


def _text(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, aiosmtplib.SMTPException) else str(exc)
    return text or type(exc).__name__
