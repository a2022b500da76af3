"""The email channel: picks the relay, sends through a pool, retries blips in-process.

Sandbox mode (the default) sends every letter to the local sandbox server, whatever the
section's relay and whatever the target's address; it refuses a sandbox host that is not a
loopback address, so a mistyped setting cannot turn the sandbox into a real relay. Live mode
uses the section's relay with the credentials from the environment variables it names.

A letter is serialised once, in :meth:`EmailChannel.prepare` (the worker's thread), and DKIM-signed
there when its section has a ``[dkim]`` table, in sandbox mode too, so what is tested is what
goes live; the pool sends those very bytes (dkim.py).

The worker sends in its own threads (:meth:`EmailChannel.deliver_blocking`): the pools are
blocking and thread-safe (pool.py says why), shared by every thread of the process.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from email.message import EmailMessage
from typing import ClassVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from dispatcher.channels.base import (
    BaseChannel,
    Bounce,
    Missing,
    Outgoing,
    Provider,
    Report,
    Secret,
    SendResult,
    Status,
)
from dispatcher.channels.email.bounces import read_bounce
from dispatcher.channels.email.dkim import Signers
from dispatcher.channels.email.message import MESSAGE_POLICY
from dispatcher.channels.email.mime import letter_bytes
from dispatcher.channels.email.pool import DataWindow, SmtpPool
from dispatcher.channels.email.relay import live_relay, tls_context
from dispatcher.channels.email.verp import Verp
from dispatcher.config.models import Section, SmtpRelay, Target
from dispatcher.errors import BlipError, ConfigError, OperationalError, TransientError
from dispatcher.logging import get_logger
from dispatcher.settings import Settings

log = get_logger(__name__)

# Postfix "2.0.0 Ok: queued as 4XyZ1", Exim "OK id=1rAbCd-000123-Ef", Sendmail
# "2.0.0 3AB12cd4 Message accepted for delivery" (not recognised: too ambiguous).
_REMOTE_ID = re.compile(r"\b(?:queued as|id=)\s*([A-Za-z0-9][A-Za-z0-9._-]*)", re.IGNORECASE)


@functools.lru_cache(maxsize=64)
def is_loopback_host(host: str) -> bool:
    """True for a loopback IP literal or the name localhost; other names are not resolved,
    because what a name resolves to when checked need not be where we later connect.
    Cached: the sandbox relay is checked for every letter, and parsing an address is not free."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: how long after `sent` a bounce may still come: a relay retries a deferred message for up to
#: about five days (Postfix's maximal_queue_lifetime, Exim's and Sendmail's defaults alike)
#: before it gives up and bounces
BOUNCE_WINDOW = timedelta(days=5)


class EmailChannel(BaseChannel):
    name: ClassVar[str] = "email"
    document: ClassVar[str] = "email"
    address_noun: ClassVar[str] = "email address"
    sent_final_after: ClassVar[timedelta | None] = BOUNCE_WINDOW
    reads_bounces: ClassVar[bool] = True
    blocking: ClassVar[bool] = True
    # (its settings are the section's historic [smtp] table, SmtpRelay, not a [channels.email] one)

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str] = os.environ,
        *,
        blip_attempts: int = 3,
        blip_wait: float = 0.25,
        blip_deadline: float = 5.0,
    ) -> None:
        """``blip_*``: in-process retries of BlipError, ``blip_attempts`` tries in all, the
        first waits about ``blip_wait`` seconds and doubling, none started after
        ``blip_deadline`` seconds."""
        super().__init__(settings)
        self._environ = environ
        self._blip_attempts = blip_attempts
        self._blip_wait = blip_wait
        self._blip_deadline = blip_deadline
        # Keyed by the relay's whole config: sections sharing a relay share its connections.
        self._pools: dict[SmtpRelay, SmtpPool] = {}
        self._pools_lock = threading.Lock()
        self._closed = False
        self._verps: dict[tuple[frozenset[str], frozenset[str]], Verp] = {}
        self._signers = Signers(settings.config_dir, environ)
        self._sandbox_relay: SmtpRelay | None = None

    @property
    def pools(self) -> Mapping[SmtpRelay, SmtpPool]:
        """The pools opened so far (read-only view, for stats and tests)."""
        return dict(self._pools)

    def relay_for(self, section: Section) -> SmtpRelay:
        """The relay a letter of ``section`` goes through in the current mode."""
        if not self.settings.live:
            host = self.settings.sandbox_smtp_host
            if not is_loopback_host(host):
                raise OperationalError(
                    f"sandbox SMTP host {host!r} is not a loopback address; sandbox mode only "
                    "ever sends to a local sandbox server"
                )
            if self._sandbox_relay is None:
                # No DNS lookup of our own name for a local sandbox connection. Built once (the
                # settings are frozen): a validated model per letter cost as much as a header.
                self._sandbox_relay = SmtpRelay(
                    host=host, port=self.settings.sandbox_smtp_port, tls="none", ehlo_name="localhost"
                )
            return self._sandbox_relay
        return live_relay(section)

    def _retry_blips(self, blip: BlipError, first: float, send: Callable[[], tuple[int, str]]) -> tuple[int, str]:
        """The quick retries after a first try (begun at ``first``) failed with ``blip``: tries
        at most ``blip_attempts`` in all, within ``blip_deadline`` of the first; the pauses
        grow from ``blip_wait``, with jitter. Raises TransientError once they are spent."""
        tries = 0
        retrying = Retrying(
            retry=retry_if_exception_type(BlipError),
            stop=stop_after_attempt(self._blip_attempts)
            | stop_before_delay(self._blip_deadline - (time.monotonic() - first)),
            wait=wait_exponential_jitter(
                multiplier=self._blip_wait, max=self._blip_deadline / 2, jitter=self._blip_wait
            ),
            before_sleep=_log_blip,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    tries += 1
                    if tries == 1:
                        raise blip  # the first try, made already: tenacity counts it and waits
                    return send()
        except BlipError as exc:
            raise TransientError(f"{exc.message} (gave up after {tries} quick tries)", code=exc.code) from exc
        raise AssertionError("unreachable: tenacity either returned or raised")

    def wire(self, message: EmailMessage, section: Section) -> bytes:
        """The bytes that go into DATA: ``message`` serialised (CRLF line ends) and, when the
        section has a [dkim] table, signed. Raises OperationalError when the section's DKIM keys
        cannot be used: our side is broken, no letter's fault."""
        return self.signed(message.as_bytes(policy=MESSAGE_POLICY), section)

    def signed(self, data: bytes, section: Section) -> bytes:
        """``data`` DKIM-signed when the section has a [dkim] table, else as it is (see :meth:`wire`)."""
        try:
            signer = self._signers.for_section(section)
        except ConfigError as exc:
            # The problems name files, keys and variables, never key material.
            raise OperationalError(f"DKIM keys of section {section.code!r}: {exc}") from None
        return data if signer is None else signer.sign(data)

    def send(
        self,
        message: bytes | EmailMessage,
        *,
        section: Section,
        recipient: str,
        window: DataWindow | None = None,
        envelope: str | None = None,
        delivery: str | None = None,
        deadline: float | None = None,
    ) -> SendResult:
        """Send ``message`` to ``recipient`` from ``envelope`` (default: the section's fixed
        envelope sender).

        ``message``: the bytes :meth:`wire` made, or an EmailMessage, which is made so here;
        ``delivery``: the delivery id, for the log (default: the message's X-Dispatch-Delivery).

        Raises DeliveryError subclasses only (see classify.py); a blip that outlasts the quick
        retries is raised as TransientError, for the ledger to retry later. ``window`` and
        ``deadline`` (a ``time.monotonic()``): see SmtpPool.send (the window is held on success,
        for the caller to release once the letter is recorded); past the deadline TimeoutError
        is raised, and no quick retry begins.
        """
        if isinstance(message, EmailMessage):
            delivery = delivery or message.get("X-Dispatch-Delivery")
            message = self.wire(message, section)
        pool = self._pool_for(section)
        started = time.perf_counter()
        sender = envelope or section.sender.envelope_sender
        first = time.monotonic()
        try:
            # The first try outside tenacity: a retrying object and its per-try machinery built
            # for every letter cost about a sixth of the send's CPU per letter when it ran on the
            # event loop (bench/worker_path.py); only a letter that blipped pays for them.
            code, text = pool.send(message, sender, [recipient], window=window, deadline=deadline)
        except BlipError as blip:
            code, text = self._retry_blips(
                blip, first, lambda: pool.send(message, sender, [recipient], window=window, deadline=deadline)
            )
        duration_ms = (time.perf_counter() - started) * 1000
        log.debug(
            "email.sent",
            relay=f"{pool.host}:{pool.port}",
            delivery=delivery,
            code=code,
            duration_ms=round(duration_ms, 1),
        )
        match = _REMOTE_ID.search(text)
        return SendResult(
            code=code,
            text=text,
            remote_id=match.group(1) if match else None,
            duration_ms=duration_ms,
        )

    # ------------------------------------------------------------------ the channel protocol

    @staticmethod
    def address_of(target: Target) -> str | None:
        return None if target.email is None else str(target.email)

    @staticmethod
    def secrets(section: Section, *, live: bool) -> list[Secret]:
        # sandbox mode never talks to the sections' relays, and signs bounce addresses with a
        # fixed key (nothing real bounces there)
        if not live:
            return []
        found = []
        if section.bounces is not None:
            found.append(
                Secret("bounces.domain", "DISPATCH_VERP_KEY", "a random key of 16 characters or more (VERP addresses)")
            )
            if section.bounces.imap is not None:
                imap = section.bounces.imap
                found.append(Secret("bounces.imap.username_env", imap.username_env, "the bounce mailbox's user name"))
                found.append(Secret("bounces.imap.password_env", imap.password_env, "the bounce mailbox's password"))
        if section.smtp is None:
            return found
        if section.smtp.username_env:
            found.append(Secret("smtp.username_env", section.smtp.username_env, "the relay user name"))
        if section.smtp.password_env:
            found.append(Secret("smtp.password_env", section.smtp.password_env, "the relay password"))
        return found

    @staticmethod
    def missing_settings(section: Section, *, live: bool) -> Missing | None:
        # in both modes: a section whose email has no relay cannot go live as it is
        if section.smtp is not None:
            return None
        return Missing("smtp", "this section has no [smtp] table (the relay its email goes through): add one")

    def provider(self, section: Section) -> Provider | None:
        if section.smtp is None:
            return None
        return Provider(f"relay:{section.smtp.host}:{section.smtp.port}", section.smtp.rate)

    @staticmethod
    def default_limits(settings: Settings) -> tuple[str, ...]:
        return settings.email_limits

    @staticmethod
    def holds_to_office_hours(target: Target) -> bool:
        return target.email_in_office_hours

    def prepare(self, letter: Outgoing) -> Outgoing:
        rendered = letter.document
        # The bytes build_message(...).as_bytes() would make, without the email package's
        # header objects (mime.py): a third of a worker's CPU per letter before.
        data = letter_bytes(
            delivery_id=letter.tag,
            section=letter.section,
            to_name=letter.target.name,
            to_address=letter.recipient,
            supporter_name=letter.sender_name,
            supporter_email=letter.reply_to,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            language=rendered.language,
            date=letter.date,
            # the Message-ID planned at intake: the stable key of this letter on every try
            message_id=letter.message_id,
        )
        return replace(letter, document=self.signed(data, letter.section))

    def deliver_blocking(self, letter: Outgoing, *, timeout: float) -> Report:
        data: bytes = letter.document  # made by prepare()
        sent = self.send(
            data,
            section=letter.section,
            recipient=letter.recipient,
            window=letter.window,
            delivery=letter.tag,
            envelope=self.envelope_sender(letter.section, letter.tag),
            deadline=time.monotonic() + timeout,
        )
        return Report(Status.ACCEPTED, sent.remote_id, tag=letter.tag, code=sent.code, text=sent.text)

    async def deliver(self, letter: Outgoing) -> Report:
        # (the worker calls deliver_blocking; this is for callers on an event loop)
        return await asyncio.to_thread(self.deliver_blocking, letter, timeout=self.send_timeout)

    # ------------------------------------------------------------------ bounces

    def envelope_sender(self, section: Section, tag: str) -> str:
        """The letter's own bounce address (VERP) when the section has a bounce domain, else the
        section's fixed envelope sender."""
        bounces = section.bounces
        if bounces is None:
            return section.sender.envelope_sender
        verp = self._verp([bounces.domain], [bounces.local_part])
        return verp.address(tag, local_part=bounces.local_part, domain=bounces.domain)

    def read_bounce(
        self, raw: bytes, *, envelope_recipients: Sequence[str], truncated: bool, sections: Iterable[Section]
    ) -> Bounce | None:
        facts = read_bounce(raw, envelope_recipients=envelope_recipients, cut=truncated)
        ours = [s.bounces for s in sections if s.bounces is not None]
        tag: str | None = None
        untagged: str | None = "no_token"
        if ours and facts.verp_candidates:
            verp = self._verp([b.domain for b in ours], [b.local_part for b in ours])
            # the worst reason wins when no candidate reads: a forgery matters more than a stranger
            order = ("not_an_address", "not_ours", "malformed", "forged")
            worst = -1
            for candidate in facts.verp_candidates:
                reading = verp.check(candidate)
                if reading.delivery_id is not None:
                    tag, untagged = reading.delivery_id, None
                    break
                if reading.refused is not None and order.index(reading.refused) > worst:
                    worst = order.index(reading.refused)
                    untagged = reading.refused
        return Bounce(
            kind=facts.kind.value,
            tag=tag,
            untagged=untagged,
            status=facts.status,
            diagnostic=facts.diagnostic,
            reporting_mta=facts.reporting_mta,
            recipient=facts.recipient,
            reported_at=facts.reported_at,
            suppress=facts.suppresses_address,
            reason=facts.reason,
        )

    def _verp(self, domains: Iterable[str], local_parts: Iterable[str]) -> Verp:
        key = (frozenset(d.lower() for d in domains), frozenset(local_parts))
        verp = self._verps.get(key)
        if verp is None:
            verp = self._verps[key] = Verp(self.settings.verp_secret(), domains=key[0], local_parts=key[1])
        return verp

    def close(self) -> None:
        """Close the pools' idle connections (QUIT); busy ones close as their sends finish."""
        with self._pools_lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def _pool_for(self, section: Section) -> SmtpPool:
        relay = self.relay_for(section)
        pool = self._pools.get(relay)
        if pool is not None and not self._closed:
            return pool
        with self._pools_lock:
            return self._open_pool(relay)

    def _open_pool(self, relay: SmtpRelay) -> SmtpPool:
        if self._closed:
            raise RuntimeError("the email channel is closed")
        pool = self._pools.get(relay)
        if pool is None:
            if self.settings.live:
                username, password = self._credentials(relay)
                pool = SmtpPool.for_relay(
                    relay,
                    username=username,
                    password=password,
                    tls_context=tls_context(relay, self.settings.config_dir),
                )
            else:
                pool = SmtpPool.for_relay(relay)
            self._pools[relay] = pool
        return pool

    def _credentials(self, relay: SmtpRelay) -> tuple[str | None, str | None]:
        if relay.username_env is None or relay.password_env is None:
            return None, None
        values = []
        for name in (relay.username_env, relay.password_env):
            value = self._environ.get(name)
            if not value:
                # Name the variable, never a value.
                raise OperationalError(f"SMTP credentials for {relay.host}: environment variable {name} is not set")
            values.append(value)
        return values[0], values[1]


def _log_blip(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.info("email.blip_retry", attempt=state.attempt_number, error=str(error))
