"""One mail transaction with RFC 2920 PIPELINING, on a connection aiosmtplib opened.

Why: a letter's transaction is four round trips one after another (MAIL, RCPT, DATA, the
message), and each costs the event loop a turn, a send and a receive. A relay that says
PIPELINING takes MAIL, RCPT and DATA in one write and answers them in order; then only the
message is a second round trip. bench/smtp_client_cost.py measured the difference, and the
worker's CPU per letter is what issue 11 asks to cut.

Why not aiosmtplib itself: its protocol parses one reply per read and drops anything it was
not waiting for, so several replies arriving together would be lost. The connection (TCP,
TLS, EHLO, AUTH), RSET and QUIT stay the library's. For the transaction only,
:class:`ReplyReader` stands in as the transport's protocol (``set_protocol``, public asyncio)
and then hands the connection back. A lost connection is passed on to aiosmtplib's protocol,
so the library sees it as it would have.

What a relay answers is read the same way and raises the same errors as the one-command-at-a-
time path (dispatcher/channels/email/pool.py), with one difference RFC 2920 brings: DATA is
already sent when MAIL or RCPT is refused. A relay that follows the RFC refuses that DATA too
(503, 554) and the pool's RSET puts the connection right. One that answers 354 all the same
would take whatever comes next as the message, so the connection is closed without sending
anything: nothing is delivered, to nobody.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPStatus

from dispatcher.channels.email.classify import Stage

#: aiosmtplib's limits on what it reads (aiosmtplib/protocol.py)
_MAX_LINE = 8192
_MAX_BUFFER = _MAX_LINE * 4


class DataWindow(Protocol):
    """What a transaction needs of dispatcher.queue.window.WindowTicket."""

    async def acquire(self) -> None: ...

    def release(self) -> None: ...


class ReplyReader(asyncio.Protocol):
    """Every complete reply that arrives, in order; stands in for aiosmtplib's protocol."""

    def __init__(self, inner: asyncio.BaseProtocol) -> None:
        self._inner = inner
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def next(self) -> SMTPResponse:
        """The next reply; raises when the connection is gone or the relay speaks nonsense."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer.extend(data)
        try:
            self._parse()
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)
        if len(self._buffer) > _MAX_BUFFER:
            self._fail(aiosmtplib.SMTPResponseException(SMTPStatus.invalid_response.value, "Response too long"))
        if self._replies:
            self._wake()

    def _parse(self) -> None:
        # aiosmtplib's _read_response_from_buffer, for as many replies as the buffer holds
        buffer = self._buffer
        start = 0
        while True:
            offset, message = start, bytearray()
            code = -1
            while True:
                end = buffer.find(b"\n", offset)
                if end == -1:
                    del buffer[:start]
                    return
                line = bytes(buffer[offset : end + 1])
                if len(line) > _MAX_LINE:
                    raise aiosmtplib.SMTPResponseException(SMTPStatus.invalid_response.value, "Response too long")
                try:
                    code = int(line[:3])
                except ValueError:
                    text = line.decode("utf-8", errors="ignore")
                    raise aiosmtplib.SMTPResponseException(
                        SMTPStatus.invalid_response.value, f"Malformed SMTP response line: {text}"
                    ) from None
                offset = end + 1
                if message:  # (as aiosmtplib joins lines: an empty first line leaves no LF)
                    message.extend(b"\n")
                message.extend(line[4:].strip(b" \t\r\n"))
                if line[3:4] != b"-":
                    break
            self._replies.append(SMTPResponse(code, bytes(message).decode("utf-8", "surrogateescape")))
            start = offset

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes, and connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        error.__cause__ = exc
        self._fail(error)
        # aiosmtplib learns it too: its SMTP object is disconnected, as if it had been reading
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def offered(smtp: aiosmtplib.SMTP) -> bool:
    """Whether this connection may pipeline: EHLO done and PIPELINING among its extensions."""
    return not smtp.is_ehlo_or_helo_needed and smtp.supports_extension("pipelining")


async def transact(
    smtp: aiosmtplib.SMTP,
    *,
    sender: str,
    options: Sequence[str],
    recipients: Sequence[str],
    wire: bytes,
    window: DataWindow | None,
    stage: Callable[[Stage], None],
    timer: Callable[[bool], None],
) -> SMTPResponse:
    """MAIL, RCPT and DATA in one write, then ``wire`` (the message as it goes after DATA, see
    pool.wire_data) once DATA's 354 is in; the final reply. ``stage`` is called with the
    command whose reply is awaited, so the caller can classify a failure by where it happened;
    ``timer(True)`` when replies are due (after each write: every command has the relay's
    timeout from when it went), ``timer(False)`` while waiting for the send window, which has
    no timeout.

    ``window`` is acquired once 354 is in, just before the message goes: only its closing dot
    lets the relay accept the letter. It is released here if anything fails after that;
    after a 250 it is still held, as with SmtpPool.send.

    Raises aiosmtplib's errors, as its own commands would: SMTPSenderRefused,
    SMTPRecipientRefused, SMTPDataError, SMTPServerDisconnected, SMTPResponseException."""
    protocol = smtp.protocol
    # (aiosmtplib types it as a BaseTransport; it writes to it as a Transport, as we do)
    transport = cast(asyncio.Transport | None, protocol.transport if protocol is not None else None)
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    replies = ReplyReader(protocol)
    transport.set_protocol(replies)
    try:
        group = [b" ".join((b"MAIL FROM:<" + sender.encode("ascii") + b">", *(o.encode("ascii") for o in options)))]
        group += [b"RCPT TO:<" + recipient.encode("ascii") + b">" for recipient in recipients]
        transport.write(b"\r\n".join(group) + b"\r\nDATA\r\n")
        timer(True)
        # Every reply is read, refused or not, so that the connection stays in step.
        refusal: aiosmtplib.SMTPResponseException | None = None
        stage("mail")
        reply = await replies.next()
        if reply.code != SMTPStatus.completed:
            refusal = aiosmtplib.SMTPSenderRefused(reply.code, reply.message, sender)
        stage("rcpt")
        for recipient in recipients:
            reply = await replies.next()
            if refusal is None and reply.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
                refusal = aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
        stage("data")
        reply = await replies.next()
        if refusal is not None:
            if reply.code == SMTPStatus.start_input:
                # It waits for a message we will not send: whatever came next would be one.
                transport.close()
            raise refusal  # (its class says which command was refused: classify.py)
        if reply.code != SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        if window is not None:
            timer(False)
            await window.acquire()
        try:
            transport.write(wire)
            timer(True)
            reply = await replies.next()
            if reply.code != SMTPStatus.completed:
                raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        except BaseException:
            if window is not None:
                # No 250: the letter is recorded as refused or retried, not as sent.
                window.release()
            raise
        return reply
    finally:
        transport.set_protocol(protocol)
