"""The bounce domain's inbound SMTP server: ``dispatcher bounces`` listens where the bounce
domain's MX points, takes every message for our bounce addresses, and hands it, raw, to a
handler (:class:`dispatcher.queue.bounces.BounceIntake`).

It never relays and accepts mail only for the bounce domains it is given (anything else gets
``550 5.1.1`` at RCPT, so it is no open sink for spam). The reply to DATA follows the handler:

* handled (applied, recorded or dropped as forged, unknown or unreadable): ``250``; a message
  we cannot use is not worth a retry, and the log and counters say why it was dropped;
* ``later`` (its letter is still being sent) or the handler failed: ``451``, so the sending MTA
  keeps the bounce and tries again. Nothing is lost.

Messages above ``max_bytes`` are handed over cut (``truncated``): the facts of a DSN are in its
first part, and a 10 MB returned original is not worth parsing. Above ``data_size_limit`` the
server refuses the message with ``552`` before storing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

from aiosmtpd.smtp import SMTP, Envelope, Session

from dispatcher.logging import get_logger
from dispatcher.sandbox.smtp import LoopbackController, SmtpServerThread

log = get_logger(__name__)

#: ``handle(raw, envelope_recipients, truncated)`` → "later" to have the sender retry, anything
#: else for done
InboundHandler = Callable[[bytes, Sequence[str], bool], str]

#: what is handed to the handler at most; the rest of a larger message is cut
MAX_BYTES = 1024 * 1024
#: what the server takes at all (aiosmtpd holds a message in memory while it arrives)
DATA_SIZE_LIMIT = 32 * 1024 * 1024


class _Handler:
    def __init__(self, handle: InboundHandler, domains: Iterable[str], max_bytes: int):
        self.handle = handle
        self.domains = frozenset(d.lower().rstrip(".") for d in domains)
        self.max_bytes = max_bytes

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        domain = address.rpartition("@")[2].lower().rstrip(".")
        if domain not in self.domains:
            return "550 5.1.1 not a bounce address of this server"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        truncated = len(content) > self.max_bytes
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(
                None, self.handle, content[: self.max_bytes], list(envelope.rcpt_tos), truncated
            )
        except Exception as exc:  # noqa: BLE001 - any failure: the sender keeps the bounce and retries
            # the message's text may quote a supporter's letter: type and size only
            log.error("email.bounce_failed", error=type(exc).__name__, size=len(content))
            return "451 4.3.0 could not record the bounce; try again later"
        if outcome == "later":
            return "451 4.3.0 the letter this is about is still being sent; try again later"
        return "250 2.0.0 OK"


class BounceListener(SmtpServerThread):
    """The inbound server in a thread of its own: ``start()``, ``port``, ``stop()``."""

    what = "the bounce listener"

    def __init__(
        self,
        handle: InboundHandler,
        *,
        domains: Iterable[str],
        host: str = "127.0.0.1",
        port: int = 0,
        max_bytes: int = MAX_BYTES,
        data_size_limit: int = DATA_SIZE_LIMIT,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__(host, port)
        self._handler = _Handler(handle, domains, max_bytes)
        self._data_size_limit = data_size_limit
        self._server_hostname = server_hostname

    def _controller(self) -> LoopbackController:
        return LoopbackController(
            self._handler,
            hostname=self.host,
            port=self._requested_port,
            data_size_limit=self._data_size_limit,
            # no reverse lookup of our own name per connection
            server_hostname=self._server_hostname or "bounces.invalid",
            ident="appeal-dispatcher bounces",
        )
