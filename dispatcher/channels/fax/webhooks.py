"""Gateway status webhooks: authenticate, read, confirm where the gateway signs nothing, apply.

Telnyx signs its webhooks (Ed25519 over ``"{timestamp}|{raw body}"``); Sinch does not, so its
callbacks carry credentials in the URL we gave it and every one is confirmed by asking Sinch
for the fax before the ledger believes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from starlette.concurrency import run_in_threadpool

from dispatcher.channels.fax.base import FaxReport
from dispatcher.channels.fax.gateways import SINCH_CALLBACK_USER
from dispatcher.config.catalog import Catalog
from dispatcher.errors import IntakeError
from dispatcher.ledger.store import Ledger
from dispatcher.settings import Settings


class WebhookNotConfigured(IntakeError):
    status = 503
    code = "webhook_not_configured"


class FaxWebhooks:
    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        ledger: Ledger,
        apply: Callable[[FaxReport], str],
        channel: object,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.catalog = catalog
        self.ledger = ledger
        self.apply = apply
        self.channel = channel
        self.clock = clock
        # Read once, here: a key that cannot be read stops the API from being built at all.
        self._telnyx_key = settings.telnyx_webhook_key()

    async def telnyx(self, raw: bytes, headers: Mapping[str, str]) -> str:
        from dispatcher.channels.fax.telnyx import parse_webhook

        if self._telnyx_key is None:
            raise WebhookNotConfigured("DISPATCH_TELNYX_PUBLIC_KEY is not set on this server")
        report = parse_webhook(raw, headers, self._telnyx_key, now=self.clock())
        return await run_in_threadpool(self.apply, report)

    async def sinch(self, raw: bytes, headers: Mapping[str, str], query: Mapping[str, str]) -> str:
        from dispatcher.channels.fax.sinch import parse_callback

        report = parse_callback(
            raw, headers, username=SINCH_CALLBACK_USER, secret=self.settings.sinch_callback_token, query=query
        )
        # Unsigned: what counts is what Sinch says when we ask, through the section's own account.
        row = await run_in_threadpool(self.ledger.views.delivery, report.tag) if report.tag else None
        if row is None:
            return await run_in_threadpool(self.apply, report)  # unknown tag: the applier logs and drops it
        gateway = self.channel.gateway_for(self.catalog.section(row.section))  # type: ignore[attr-defined]
        confirmed = await gateway.confirm(report)
        return await run_in_threadpool(self.apply, confirmed)
