"""Reading the public keys that verify providers' webhooks (Telnyx signs with Ed25519)."""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key


def load_public_key(key: bytes | str | Ed25519PublicKey) -> Ed25519PublicKey:
    """The Ed25519 public key from base64 text, PEM, or 32 raw bytes (``bytes`` only: 32
    characters of text are a truncated or mistyped key, not raw bytes). ValueError saying what
    is wrong if it is none of those: a configuration mistake, not the sender's. The messages
    never quote the key: a secret pasted into the wrong variable must not reach a log."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, str):
        try:
            data = key.strip().encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("the Telnyx public key has non-ASCII characters; expected base64 or PEM") from None
    else:
        data = key
    if data.startswith(b"-----BEGIN"):
        try:
            loaded = load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("the Telnyx public key is not readable PEM") from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise ValueError("the Telnyx public key is PEM but not an Ed25519 key")
        return loaded
    if isinstance(key, str) or len(data) != 32:
        try:
            data = base64.b64decode(data, validate=True)
        except binascii.Error:
            raise ValueError("the Telnyx public key is not base64 (nor PEM)") from None
    if len(data) != 32:
        raise ValueError(f"the Telnyx public key decodes to {len(data)} bytes; an Ed25519 public key has 32")
    return Ed25519PublicKey.from_public_bytes(data)
