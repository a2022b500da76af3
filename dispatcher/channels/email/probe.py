"""Does a relay accept us? EHLO, STARTTLS, AUTH, then QUIT: no message is sent.

What ``dispatcher preflight`` asks before a section goes live. The conversation is the worker's
own (the same EHLO name, TLS mode, trusted CAs and credentials), so a relay that passes here
takes the worker's letters; each way it can fail says which part of the configuration is wrong.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Literal

import aiosmtplib

from dispatcher.config.models import SmtpRelay
from dispatcher.errors import OperationalError

#: where the conversation stopped: the relay's address, TLS, our EHLO name, or our login
Stage = Literal["connect", "tls", "ehlo", "login"]


class RelayRefused(OperationalError):
    """The relay did not take us as far as a login (or, without credentials, EHLO)."""

    def __init__(self, stage: Stage, message: str, *, code: int | None = None):
        super().__init__(message, code=code)
        self.stage: Stage = stage


async def check_relay(
    relay: SmtpRelay,
    *,
    username: str | None,
    password: str | None,
    tls_context: ssl.SSLContext | None,
    timeout: float = 10.0,
) -> str:
    """Talk to ``relay`` up to AUTH and leave politely; what the relay last said on success.
    Raises :class:`RelayRefused` naming the stage that failed."""
    smtp = aiosmtplib.SMTP(
        hostname=relay.host,
        port=relay.port,
        timeout=timeout,
        use_tls=relay.tls == "implicit",
        # STARTTLS by hand below, so a TLS failure is told apart from a refused EHLO
        start_tls=False,
        local_hostname=relay.ehlo_name,
        tls_context=tls_context,
    )
    try:
        try:
            await smtp.connect()
        except aiosmtplib.SMTPException as exc:
            if _is_tls(exc):
                raise RelayRefused("tls", f"TLS with {relay.host}:{relay.port} failed: {_cause(exc)}") from exc
            raise RelayRefused("connect", f"cannot connect to {relay.host}:{relay.port}: {_cause(exc)}") from exc
        await _ehlo(smtp, relay)
        if relay.tls == "starttls":
            if not smtp.supports_extension("starttls"):
                raise RelayRefused("tls", f'{relay.host} does not offer STARTTLS (tls = "starttls")')
            try:
                await smtp.starttls()
            except (aiosmtplib.SMTPException, ssl.SSLError, ssl.CertificateError) as exc:
                raise RelayRefused("tls", f"STARTTLS with {relay.host} failed: {_cause(exc)}") from exc
            await _ehlo(smtp, relay)
        answer = "EHLO accepted"
        if username is not None and password is not None:
            if not smtp.supports_extension("auth"):
                raise RelayRefused("login", f"{relay.host} offers no AUTH on this connection")
            try:
                reply = await smtp.login(username, password)
            except aiosmtplib.SMTPResponseException as exc:
                raise RelayRefused("login", f"login refused: {exc.code} {exc.message}", code=exc.code) from exc
            except aiosmtplib.SMTPException as exc:
                raise RelayRefused("login", f"login failed: {_cause(exc)}") from exc
            answer = f"login accepted: {reply.code} {reply.message}"
        with contextlib.suppress(aiosmtplib.SMTPException):
            await smtp.quit()
        return answer
    finally:
        smtp.close()


async def _ehlo(smtp: aiosmtplib.SMTP, relay: SmtpRelay) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPResponseException as exc:
        raise RelayRefused(
            "ehlo", f"{relay.host} refused EHLO {relay.ehlo_name}: {exc.code} {exc.message}", code=exc.code
        ) from exc
    except aiosmtplib.SMTPException as exc:
        raise RelayRefused("connect", f"{relay.host} closed the connection at EHLO: {_cause(exc)}") from exc


def _is_tls(exc: BaseException) -> bool:
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, (ssl.SSLError, ssl.CertificateError)):
            return True
        current = current.__cause__ or current.__context__
    return False


def _cause(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, aiosmtplib.SMTPException) else str(exc)
    return text or type(exc).__name__
