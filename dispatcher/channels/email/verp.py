"""VERP: a per-letter envelope sender that names its letter when a bounce comes back.

Each letter leaves with ``MAIL FROM:<bounces+TOKEN@bounces.section.example>``. A relay that
gives up sends its bounce to that address, so the address alone says which letter failed, even
when the bounce is in a format nobody can parse. The token carries the delivery id and a keyed
MAC over it, so a stranger cannot make us mark someone else's letter as bounced by mailing
``bounces+<a guessed id>@...``.

The token is base32 (RFC 4648) in lower case without padding, of 26 bytes:

* the id's two-letter prefix (``dl``, a digest's own prefix, ...), as ASCII;
* the id's 32 hex digits as 16 raw bytes;
* the first 8 bytes of HMAC-SHA256(key, label + the 18 bytes above).

That is 42 characters, so ``bounces+TOKEN`` is 50, well under the 64 RFC 5321 allows a local
part. Base32 has one letter case and no punctuation: relays and mailboxes that upper-case an
address (some do) or fold it do not break it, and :meth:`Verp.read` ignores case. 64 bits of
MAC are plenty when a forger can only try by sending mail, and every failure is counted.

Keys rotate: pass the keys a section used before as ``previous_keys`` and tokens made with
them are still read for as long as they stay listed (a bounce can come days after the send).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

#: what an id must look like to fit in a token (dispatcher.ledger.engine.new_id)
_ID = re.compile(r"([a-z]{2})_([0-9a-f]{32})")
#: separates the MAC's input from anything else this key might ever sign
_LABEL = b"dispatcher-verp-v1\x00"
_MAC_BYTES = 8
_TOKEN_BYTES = 2 + 16 + _MAC_BYTES
_TOKEN_CHARS = 42
_MIN_KEY_BYTES = 16

#: why an address gave no delivery id, for the counter and the log
Refusal = Literal["not_an_address", "not_ours", "malformed", "forged"]


@dataclass(frozen=True)
class VerpReading:
    """What :meth:`Verp.check` made of an address: a delivery id, or the reason there is none.

    ``not_ours``: another local part or domain (mail to postmaster@, a plain ``bounces@``).
    ``malformed``: ours, but the token is not one we could have made (cut, wrong length, not
    base32, an unknown layout). ``forged``: well formed, but the MAC is wrong for every key.
    """

    delivery_id: str | None
    refused: Refusal | None = None


class Verp:
    """Builds and reads VERP addresses for a set of bounce domains, with one secret key.

    ``domains`` are the bounce domains this service receives mail for; an address on any other
    domain reads as ``not_ours`` and :meth:`address` refuses to build one there. ``local_parts``
    are the bases before the ``+`` (``bounces`` unless a section says otherwise).
    """

    def __init__(
        self,
        key: bytes,
        *,
        domains: Iterable[str],
        local_parts: Iterable[str] = ("bounces",),
        previous_keys: Iterable[bytes] = (),
    ):
        keys = [key, *previous_keys]
        if any(len(k) < _MIN_KEY_BYTES for k in keys):
            raise ValueError(f"a VERP key must be at least {_MIN_KEY_BYTES} bytes")
        self._key = key
        self._keys = tuple(keys)
        self._domains = frozenset(_domain(d) for d in domains)
        self._local_parts = frozenset(lp.lower() for lp in local_parts)
        if not self._domains or not self._local_parts:
            raise ValueError("a Verp needs at least one bounce domain and one local part")

    def address(self, delivery_id: str, *, local_part: str = "bounces", domain: str) -> str:
        """``<local_part>+<token>@<domain>`` for ``delivery_id``.

        Raises ValueError for an id not shaped like ``xx_`` + 32 lowercase hex digits (it
        would not fit in a local part), or for a local part or domain this Verp would not
        read back (a return path that could never be matched is a silent bug).
        """
        match = _ID.fullmatch(delivery_id)
        if match is None:
            raise ValueError(f"cannot make a VERP token for an id shaped like {delivery_id[:8]!r}...")
        if local_part.lower() not in self._local_parts or _domain(domain) not in self._domains:
            raise ValueError(f"{local_part}@{domain} is not a bounce address this Verp reads")
        body = match.group(1).encode("ascii") + bytes.fromhex(match.group(2))
        token = _encode(body + self._mac(self._key, body))
        return f"{local_part}+{token}@{domain}"

    def read(self, address: str) -> str | None:
        """The delivery id an address carries, or None (why: see :meth:`check`)."""
        return self.check(address).delivery_id

    def check(self, address: str) -> VerpReading:
        """Reads ``address`` (bare, or in angle brackets as in Return-Path) in any letter case."""
        text = address.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1].strip()
        local, at, domain = text.rpartition("@")
        if not at or not local or not domain:
            return VerpReading(None, "not_an_address")
        base, plus, token = local.partition("+")
        if not plus or base.lower() not in self._local_parts or _domain(domain) not in self._domains:
            return VerpReading(None, "not_ours")
        raw = _decode(token)
        if raw is None or len(raw) != _TOKEN_BYTES:
            return VerpReading(None, "malformed")
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        prefix = body[:2].decode("ascii", errors="replace")
        if not (prefix.isascii() and prefix.isalpha() and prefix.islower()):
            return VerpReading(None, "malformed")
        # Every key is tried (no early exit) so the time taken says nothing about which matched.
        matches = [hmac.compare_digest(mac, self._mac(k, body)) for k in self._keys]
        if not any(matches):
            return VerpReading(None, "forged")
        return VerpReading(f"{prefix}_{body[2:].hex()}")

    @staticmethod
    def _mac(key: bytes, body: bytes) -> bytes:
        return hmac.new(key, _LABEL + body, hashlib.sha256).digest()[:_MAC_BYTES]


def _domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def _decode(token: str) -> bytes | None:
    # Only the exact length we make: b32decode would accept padding or whitespace in the
    # middle, and a token that is not character for character ours is not ours.
    if len(token) != _TOKEN_CHARS or not token.isascii() or not token.isalnum():
        return None
    try:
        raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    except (binascii.Error, ValueError):
        return None
    # The last character holds 2 bits of data and 3 unused ones, which b32decode ignores: only
    # the one spelling we produce counts, so any changed character is a changed token.
    return raw if _encode(raw) == token.lower() else None


def _encode(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()
