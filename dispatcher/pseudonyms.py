"""The keyed hash that stands for a supporter wherever their email must not: duplicates, quotas,
logs, the audit log, and the lookup of an erasure by email.

HMAC-SHA256 keyed with the pepper (``DISPATCH_PEPPER``) over the address trimmed and lower-cased,
the first 32 hex digits. Without the pepper it cannot be checked against a list of addresses.
"""

from __future__ import annotations

import hashlib
import hmac

from dispatcher.settings import Settings

#: the key when DISPATCH_PEPPER is unset (dev and tests; production sets its own)
DEFAULT_PEPPER = "appeal-dispatcher"


def pepper_of(settings: Settings) -> bytes:
    return (settings.pepper or DEFAULT_PEPPER).encode()


def supporter_ref(email: str, pepper: bytes) -> str:
    return hmac.new(pepper, email.strip().lower().encode(), hashlib.sha256).hexdigest()[:32]
