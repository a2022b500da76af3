"""Live fax gateways, built from a section's ``[fax]`` table and the environment it names."""

from __future__ import annotations

from collections.abc import Mapping

from dispatcher.channels.fax.base import FaxGateway
from dispatcher.config.models import Section
from dispatcher.errors import OperationalError
from dispatcher.settings import Settings

#: the user name in the credentials Sinch sends back with every callback
SINCH_CALLBACK_USER = "dispatch"


def _secret(environ: Mapping[str, str], name: str | None, section: Section) -> str:
    value = environ.get(name or "", "")
    if not value:
        raise OperationalError(f"section {section.code!r}: fax credential ${name} is not set")
    return value


def build_gateway(section: Section, environ: Mapping[str, str], settings: Settings) -> FaxGateway:
    fax = section.fax
    if fax is None:
        raise OperationalError(f"section {section.code!r} has no [fax] gateway configured")
    if fax.from_number is None:
        raise OperationalError(f"section {section.code!r}: [fax] from_number is needed in live mode")
    if fax.gateway == "telnyx":
        from dispatcher.channels.fax import telnyx

        assert fax.connection_id is not None
        return telnyx.TelnyxGateway(
            _secret(environ, fax.api_key_env, section),
            fax.connection_id,
            fax.from_number,
            base_url=fax.base_url or telnyx.DEFAULT_BASE_URL,
            webhook_url=f"{settings.public_url}/v1/webhooks/fax/telnyx" if settings.public_url else None,
        )
    from dispatcher.channels.fax import sinch

    assert fax.project_id is not None
    callback = None
    if settings.public_url and settings.sinch_callback_token:
        callback = sinch.callback_url(
            f"{settings.public_url}/v1/webhooks/fax/sinch", SINCH_CALLBACK_USER, settings.sinch_callback_token
        )
    return sinch.SinchGateway(
        fax.project_id,
        _secret(environ, fax.key_id_env, section),
        _secret(environ, fax.key_secret_env, section),
        fax.from_number,
        base_url=fax.base_url or sinch.DEFAULT_BASE_URL,
        callback_url=callback,
    )


async def check_access(section: Section, environ: Mapping[str, str], settings: Settings) -> None:
    """Ask the section's live gateway a read-only question with the section's credentials.
    Raises OperationalError when a credential or ``from_number`` is missing, and the gateway's
    classified refusal otherwise (BlipError: no answer at all)."""
    from dispatcher.channels.fax.sinch import SinchGateway
    from dispatcher.channels.fax.telnyx import TelnyxGateway

    gateway = build_gateway(section, environ, settings)
    try:
        assert isinstance(gateway, (TelnyxGateway, SinchGateway))
        await gateway.check_access()
    finally:
        await gateway.aclose()
