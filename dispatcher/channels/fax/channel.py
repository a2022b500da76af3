"""The fax channel: picks the gateway for a letter and hands it the fax; reads the gateways' reports.

Sandbox mode (the default) always uses the sandbox gateway the wiring hands in (the local fax
lab, :mod:`dispatcher.sandbox.faxlab`), whatever the target's number. Live mode uses the gateway
the section's ``[fax]`` table names.

A fax is settled only by its gateway's final word: ``sent`` means "accepted by the gateway",
never "arrived". That word comes by webhook (:meth:`FaxChannel.read_webhook`) or, when the
webhook is late, by asking (:meth:`FaxChannel.poll`). A fax machine takes one call at a time,
so one fax is in flight per number.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import ClassVar

from dispatcher.channels.base import (
    BaseChannel,
    Missing,
    Outgoing,
    Provider,
    Report,
    Secret,
    SectionOf,
    Status,
    WebhookRequest,
)
from dispatcher.channels.fax.base import FaxGateway, FaxJob, FaxReport, FaxStatus
from dispatcher.channels.fax.gateways import SINCH_CALLBACK_USER, build_gateway
from dispatcher.config.models import Section, Target
from dispatcher.errors import IntakeError, NotFound, OperationalError, TransientError
from dispatcher.settings import Settings

#: builds a live gateway for a section; see dispatcher.channels.fax.gateways
GatewayFactory = Callable[[Section, Mapping[str, str], Settings], FaxGateway]

#: the gateways whose status webhooks the API takes
WEBHOOK_GATEWAYS = ("telnyx", "sinch")

#: per gateway: the variable holding what authenticates its webhooks, and what that is
WEBHOOK_KEYS: dict[str, tuple[str, str]] = {
    "telnyx": ("DISPATCH_TELNYX_PUBLIC_KEY", "Telnyx's webhook public key (base64, from the Telnyx portal)"),
    "sinch": ("DISPATCH_SINCH_CALLBACK_TOKEN", "a long random secret that Sinch's callback URLs carry"),
}


class WebhookNotConfigured(IntakeError):
    status = 503
    code = "webhook_not_configured"


def as_report(found: FaxReport, *, unsettled: Status = Status.ACCEPTED) -> Report:
    """A gateway's word on a fax, in the channel protocol's terms. ``unsettled``: what a fax not
    yet final is — accepted (from a create call or a lookup) or mere progress (a webhook)."""
    if found.status is FaxStatus.DELIVERED:
        status, text, error = Status.DELIVERED, "delivered", None
    elif found.status is FaxStatus.FAILED:
        error = found.failure.error() if found.failure else TransientError("failed without a reason")
        status, text = Status.FAILED, error.message
    else:
        status, text, error = unsettled, f"accepted by {found.gateway}; awaiting the gateway's report", None
    return Report(
        status=status,
        remote_id=found.remote_id,
        tag=found.tag,
        code=found.raw_status,
        text=text,
        error=error,
        provider=found.gateway,
        pages=found.pages,
        line_seconds=found.duration_s,
    )


class FaxChannel(BaseChannel):
    name: ClassVar[str] = "fax"
    document: ClassVar[str] = "fax"
    address_noun: ClassVar[str] = "fax number"
    #: never by itself: only the gateway's report settles a fax
    sent_final_after: ClassVar[timedelta | None] = None
    one_at_a_time: ClassVar[bool] = True
    poll_after: timedelta | None = timedelta(minutes=30)

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str] | None = None,
        *,
        lab: FaxGateway | Callable[[], FaxGateway] | None = None,
        live_gateway: GatewayFactory | None = None,
        clock: Callable[[], float] = time.time,
    ):
        """``lab``: the sandbox gateway, or a function building it on the first fax (the lab
        loads spandsp and WeasyPrint's neighbours: an email-only worker should not pay for it)."""
        super().__init__(settings)
        self.environ = os.environ if environ is None else environ
        self._lab = lab
        self._live_factory = live_gateway or build_gateway
        self._live: dict[str, FaxGateway] = {}
        self._clock = clock
        #: a fax call of a few pages takes minutes; a gateway may queue it before dialling
        self.send_timeout = 300.0
        #: how long a letter waits when its number's line is busy
        self.line_wait_seconds = settings.fax_line_wait_seconds
        self.poll_after = timedelta(seconds=settings.fax_report_wait_seconds)
        # Read once, here: a key that cannot be read stops the API from being built at all.
        self._telnyx_key = settings.telnyx_webhook_key()

    # ------------------------------------------------------------------ facts

    @staticmethod
    def address_of(target: Target) -> str | None:
        return target.fax

    @staticmethod
    def secrets(section: Section, *, live: bool) -> list[Secret]:
        if not live or section.fax is None:
            return []
        gateway = section.fax.gateway
        found = [Secret(f"fax.{key}", env, f"the {gateway} credentials") for key, env in section.fax.secret_envs()]
        # The gateway's reports come by webhook: without these, every fax stays `sent` until the
        # reconciler asks, and the API refuses the webhooks it does get.
        found.append(
            Secret("fax.gateway", "DISPATCH_PUBLIC_URL", f"this API's public https address, for {gateway}'s webhooks")
        )
        found.append(Secret("fax.gateway", *WEBHOOK_KEYS[gateway]))
        return found

    @staticmethod
    def missing_settings(section: Section, *, live: bool) -> Missing | None:
        # Sandbox mode faxes the local fax lab: only live mode needs a gateway.
        if not live:
            return None
        if section.fax is None:
            return Missing("fax", "this section has no [fax] table: live mode sends faxes through a gateway")
        if section.fax.from_number is None:
            return Missing("fax.from_number", "live mode needs the number faxes are sent from")
        return None

    def provider(self, section: Section) -> Provider | None:
        if section.fax is None:
            return None
        return Provider(f"gateway:{section.fax.gateway}:{section.code}", section.fax.rate)

    @staticmethod
    def default_limits(settings: Settings) -> tuple[str, ...]:
        return settings.fax_limits

    @staticmethod
    def holds_to_office_hours(target: Target) -> bool:
        return True

    # ------------------------------------------------------------------ gateways

    @property
    def lab(self) -> FaxGateway:
        if self._lab is None:
            raise OperationalError("sandbox mode needs the fax lab, and this fax channel was built without one")
        if not isinstance(self._lab, FaxGateway):
            self._lab = self._lab()
        return self._lab

    def gateway_for(self, section: Section) -> FaxGateway:
        if not self.settings.live:
            return self.lab
        if section.fax is None:
            raise OperationalError(f"section {section.code!r} has no [fax] gateway configured for live mode")
        gateway = self._live.get(section.code)
        if gateway is None:
            gateway = self._live[section.code] = self._live_factory(section, self.environ, self.settings)
        return gateway

    # ------------------------------------------------------------------ sending

    def prepare(self, letter: Outgoing) -> Outgoing:
        document = letter.document
        fax = letter.section.fax
        job = FaxJob(
            tag=letter.tag,
            to_number=letter.recipient,
            pdf=document.pdf,
            tiff=document.tiff,
            pages=document.pages,
            from_number=fax.from_number if fax else None,
            station_id=fax.station_id if fax else None,
        )
        return replace(letter, document=job)

    async def deliver(self, letter: Outgoing) -> Report:
        job: FaxJob = letter.document  # made by prepare()
        return as_report(await self.gateway_for(letter.section).send(job))

    async def find(self, tag: str, section: Section) -> Report | None:
        # No gateway has an idempotency key: an earlier try's fax may exist although its answer
        # was lost or its worker died. The worker adopts it rather than fax the letter twice.
        found = await self.gateway_for(section).find_by_tag(tag)
        return None if found is None else as_report(found)

    async def poll(self, tag: str, remote_id: str, section: Section) -> Report | None:
        return as_report(await self.gateway_for(section).get(remote_id), unsettled=Status.PENDING)

    # ------------------------------------------------------------------ webhooks

    async def read_webhook(self, provider: str, request: WebhookRequest, section_of: SectionOf) -> Report:
        """Telnyx signs its webhooks (Ed25519 over ``"{timestamp}|{raw body}"``); Sinch does not,
        so its callbacks carry credentials in the URL we gave it and every one is confirmed by
        asking Sinch for the fax, through the section's own account, before it is believed."""
        # The gateways' modules (httpx, cryptography) are imported by the API process that takes
        # their webhooks and by live workers (gateways.py), not by every process with a fax channel.
        if provider == "telnyx":
            from dispatcher.channels.fax.telnyx import parse_webhook

            if self._telnyx_key is None:
                raise WebhookNotConfigured("DISPATCH_TELNYX_PUBLIC_KEY is not set on this server")
            found = parse_webhook(request.raw, request.headers, self._telnyx_key, now=self._clock())
            return as_report(found, unsettled=Status.PENDING)
        if provider == "sinch":
            from dispatcher.channels.fax.sinch import parse_callback

            found = parse_callback(
                request.raw,
                request.headers,
                username=SINCH_CALLBACK_USER,
                secret=self.settings.sinch_callback_token,
                query=request.query,
            )
            section = await section_of(found.tag) if found.tag else None
            if section is not None:
                confirm = getattr(self.gateway_for(section), "confirm", None)
                if confirm is not None:
                    found = await confirm(found)
            # an unknown tag is reported as it came: the report's applier logs and drops it
            return as_report(found, unsettled=Status.PENDING)
        raise NotFound(f"no fax webhook for {provider[:40]!r}")

    async def aclose(self) -> None:
        gateways = list(self._live.values())
        if isinstance(self._lab, FaxGateway):
            gateways.append(self._lab)
        for gateway in gateways:
            await gateway.aclose()
        self._live.clear()
