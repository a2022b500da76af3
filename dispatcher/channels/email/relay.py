"""A section's relay as live mode talks to it: the EHLO name it gives and the CAs it trusts.

Both the worker's pools and ``dispatcher preflight`` build their connections from here, so the
preflight's "the relay accepts us" is said of the very conversation the worker will have.
"""

from __future__ import annotations

import ssl
from functools import lru_cache
from pathlib import Path

from dispatcher.config.models import Section, SmtpRelay
from dispatcher.errors import OperationalError


def live_relay(section: Section) -> SmtpRelay:
    """The section's ``[smtp]`` with its EHLO name settled: the one configured, else the
    sender's domain (a relay that wants a fully qualified name refuses "localhost", and our own
    host name is seldom one the relay's checks would accept)."""
    relay = section.smtp
    if relay is None:
        raise OperationalError(f"section {section.code!r} has no [smtp] relay configured")
    if relay.ehlo_name is not None:
        return relay
    return relay.model_copy(update={"ehlo_name": section.sender.domain})


def ca_path(relay: SmtpRelay, config_dir: Path) -> Path | None:
    """Where ``[smtp] ca_file`` points: relative to config/ unless absolute."""
    if relay.ca_file is None:
        return None
    path = Path(relay.ca_file)
    return path if path.is_absolute() else Path(config_dir) / path


def tls_context(relay: SmtpRelay, config_dir: Path) -> ssl.SSLContext | None:
    """The TLS context for ``relay``: None (aiosmtplib's default, the system's CAs) unless the
    relay names a ``ca_file``, whose CAs are then trusted *in addition to* the system's."""
    path = ca_path(relay, config_dir)
    return None if path is None else _context(str(path))


@lru_cache(maxsize=16)
def _context(path: str) -> ssl.SSLContext:
    # One context per file: a pool opens many connections, and reading the system bundle each
    # time costs milliseconds.
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a PEM file of certificates"
        raise OperationalError(f"[smtp] ca_file {path} cannot be used: {reason}") from exc
    return context
