"""The ``Dispatch-Signature`` scheme: ``t=<unix seconds>,v1=<hex>``.

``<hex>`` is HMAC-SHA256 keyed with the section's intake key over ``<t>.<raw body>``. Several
``v1=`` values may be given (key rotation: sign with old and new key during the switch).
Replays are refused by the caller, which stores each accepted signature (see intake.service).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from dispatcher.errors import AuthenticationFailed, SignatureExpired

HEADER = "Dispatch-Signature"
_HEX64 = re.compile("[0-9a-f]{64}")
TOLERANCE_SECONDS = 300


def compute(key: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(key: bytes, body: bytes, timestamp: int | None = None) -> str:
    """The header value a web form sends with ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={compute(key, t, body)}"


@dataclass(frozen=True)
class ParsedSignature:
    timestamp: int
    signatures: tuple[str, ...]


def parse(header: str | None) -> ParsedSignature:
    if header is None or not header.strip():
        raise AuthenticationFailed(f"missing {HEADER} header; see the README for the signing scheme")
    timestamp: int | None = None
    sigs: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise AuthenticationFailed(f"malformed {HEADER} header: expected t=<unix seconds>,v1=<hex>")
        if key == "t":
            if not value.isdigit():
                raise AuthenticationFailed(f"malformed {HEADER} header: t must be unix seconds")
            timestamp = int(value)
        elif key == "v1":
            value = value.lower()
            if _HEX64.fullmatch(value) is None:
                raise AuthenticationFailed(f"malformed {HEADER} header: v1 must be 64 hex digits")
            sigs.append(value)
        # unknown schemes (v0, v2...) are ignored so that senders can add newer ones early
    if timestamp is None or not sigs:
        raise AuthenticationFailed(f"malformed {HEADER} header: expected t=<unix seconds>,v1=<hex>")
    return ParsedSignature(timestamp, tuple(sigs))


def verify(key: bytes, body: bytes, header: str | None, now: float, tolerance: int = TOLERANCE_SECONDS) -> str:
    """Check ``header`` against ``body``; return the matching signature (the replay key)."""
    parsed = parse(header)
    expected = compute(key, parsed.timestamp, body)
    matched = next((s for s in parsed.signatures if hmac.compare_digest(s, expected)), None)
    if matched is None:
        raise AuthenticationFailed(
            "signature does not match: sign '<t>.<raw body>' with the section's intake key as text "
            "(HMAC-SHA256, hex digest); `dispatcher sign --section CODE FILE` shows the expected value"
        )
    # Checked after the HMAC so that a stale-but-forged request learns nothing about our clock.
    skew = now - parsed.timestamp
    if abs(skew) > tolerance:
        raise SignatureExpired(
            f"signature timestamp is {abs(int(skew))} s {'old' if skew > 0 else 'in the future'}; "
            f"at most {tolerance} s of skew is accepted — sign each request when you send it"
        )
    return matched
