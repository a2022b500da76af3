"""The fax channel: picks the gateway for a letter and hands it the fax.

Sandbox mode (the default) always uses the local fax lab, whatever the target's number: the lab
places a real T.30 call in software and keeps what the receiver got under var/sandbox/fax/. Live
mode uses the gateway the section's ``[fax]`` table names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from dispatcher.channels.fax.base import FaxGateway, FaxJob, FaxReport
from dispatcher.config.models import Section
from dispatcher.errors import OperationalError
from dispatcher.settings import Settings

#: builds a live gateway for a section; see dispatcher.channels.fax.gateways
GatewayFactory = Callable[[Section, Mapping[str, str], Settings], FaxGateway]


class FaxChannel:
    name = "fax"

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str] | None = None,
        *,
        lab: FaxGateway | None = None,
        live_gateway: GatewayFactory | None = None,
    ):
        self.settings = settings
        self.environ = os.environ if environ is None else environ
        self._lab = lab
        self._live_factory = live_gateway
        self._live: dict[str, FaxGateway] = {}

    @property
    def lab(self) -> Any:
        if self._lab is None:
            from dispatcher.channels.fax.lab import FaxLab

            self._lab = FaxLab(self.settings.var_dir / "sandbox" / "fax")
        return self._lab

    def gateway_for(self, section: Section) -> FaxGateway:
        if not self.settings.live:
            return self.lab
        if section.fax is None:
            raise OperationalError(f"section {section.code!r} has no [fax] gateway configured for live mode")
        gateway = self._live.get(section.code)
        if gateway is None:
            if self._live_factory is None:
                from dispatcher.channels.fax.gateways import build_gateway

                self._live_factory = build_gateway
            gateway = self._live[section.code] = self._live_factory(section, self.environ, self.settings)
        return gateway

    async def send(self, job: FaxJob, *, section: Section) -> FaxReport:
        return await self.gateway_for(section).send(job)

    async def find_by_tag(self, tag: str, *, section: Section) -> FaxReport | None:
        return await self.gateway_for(section).find_by_tag(tag)

    async def aclose(self) -> None:
        gateways = list(self._live.values())
        if self._lab is not None:
            gateways.append(self._lab)
        for gateway in gateways:
            await gateway.aclose()
        self._live.clear()
