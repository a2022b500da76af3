"""The channels this service ships: email and fax."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from dispatcher.channels.email.channel import EmailChannel
from dispatcher.channels.fax.base import FaxGateway
from dispatcher.channels.fax.channel import FaxChannel
from dispatcher.channels.registry import Channels
from dispatcher.settings import Settings


def builtin_channels(
    settings: Settings | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    fax_lab: Callable[[], FaxGateway] | None = None,
) -> Channels:
    """A registry of the shipped channels. Without ``settings``, their kinds only (what config
    validation needs); with them, each is built on first use. ``fax_lab`` builds the sandbox
    gateway (:mod:`dispatcher.sandbox.faxlab`) the fax channel uses in sandbox mode."""
    registry = Channels()
    if settings is None:
        return registry.register(EmailChannel).register(FaxChannel)
    env = environ if environ is not None else {}
    return registry.register(EmailChannel, lambda: EmailChannel(settings, env)).register(
        FaxChannel, lambda: FaxChannel(settings, env, lab=fax_lab)
    )
