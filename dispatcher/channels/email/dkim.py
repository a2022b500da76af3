"""DKIM signatures on every letter a section with a ``[dkim]`` table sends (RFC 6376, RFC 8463).

Each message gets two DKIM-Signature headers, rsa-sha256 on top and ed25519-sha256 below it:
receivers that do not verify Ed25519 yet ignore that one (RFC 8463 §4), and some verifiers
look at the topmost signature only. Both are relaxed/relaxed and sign the headers of
``SIGNED_HEADERS`` the message has, over the exact bytes that are then sent.

What we chose for speed: dkimpy does the DKIM parts — parsing the message, relaxed
canonicalisation, hashing the signed headers together with the signature's own header, folding
— and ``cryptography`` (OpenSSL) does the private-key operations. dkimpy's own RSA is pure
Python (about 6 ms a signature with a 2048-bit key, bench/dkim_cost.py) and its Ed25519 needs PyNaCl;
OpenSSL signs the same digest in a fraction of that. Rather than calling ``dkim.sign`` twice,
which would also parse the message and canonicalise and hash its body twice, :class:`DkimSigner`
parses once, hashes the body once (both algorithms use SHA-256, so their ``bh=`` is the same)
and builds each header itself from dkimpy's functions. Two shortcuts give dkimpy's bytes for
less: only the header block goes through its parser, and a body its whitespace rules would not
change skips their regexes (:func:`_parse`, :func:`_relaxed_body`). Every signature is checked
by dkimpy's own verifier in the tests, messages with tabs, runs of spaces and LF line ends too.

Keys are PEM (PKCS#8, or PKCS#1 for RSA), from a file or from an environment variable holding
the PEM text; errors name the section file, the key and the file or variable, never key material.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim import canonicalization
from dkim.canonicalization import CanonicalizationPolicy

from dispatcher.config.models import DkimConfig, Section, ascii_domain
from dispatcher.errors import ConfigError, ConfigProblem, DispatchError

Algorithm = Literal["rsa", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

#: the headers signed, when the message has them (the MIME ones too: a changed Content-Type
#: could show a different part of the body)
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"content-language",
)
#: RSA keys shorter than this are refused (RFC 8301 asks signers for at least 2048 bits)
MIN_RSA_BITS = 2048

_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_HEADER = b"DKIM-Signature"
_WHAT = {"rsa": "an RSA private key", "ed25519": "an Ed25519 private key"}


@dataclass(frozen=True)
class SigningKey:
    selector: str
    private: PrivateKey

    @property
    def algorithm(self) -> bytes:
        return b"rsa-sha256" if isinstance(self.private, rsa.RSAPrivateKey) else b"ed25519-sha256"

    def sign(self, digest: bytes) -> bytes:
        """The signature over the SHA-256 ``digest`` of the signed headers."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        # RFC 8463 §3: Ed25519 signs the SHA-256 hash, not the headers themselves.
        return self.private.sign(digest)


class DkimSigner:
    """Signs messages as ``domain`` with each of ``keys``; safe to share between threads."""

    def __init__(self, domain: str, keys: Sequence[SigningKey], *, clock: Callable[[], float] = time.time) -> None:
        if not keys:
            raise ValueError("a signer needs at least one key")
        self.domain = domain
        self.keys = tuple(keys)
        self._clock = clock

    def sign(self, message: bytes) -> bytes:
        """``message`` (CRLF line ends, as it goes into DATA) with the signature headers on top."""
        headers, body = _parse(message)
        present = {name.lower() for name, _ in headers}
        signed = [name for name in SIGNED_HEADERS if name in present]
        if b"from" not in present:
            raise ValueError("a message without From cannot be DKIM-signed")
        canonical = _RELAXED.canonicalize_headers(headers)
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest())
        domain = self.domain.encode("ascii")
        stamp = str(int(self._clock())).encode("ascii")
        out = []
        for key in self.keys:
            tags = [
                (b"v", b"1"),
                (b"a", key.algorithm),
                (b"c", b"relaxed/relaxed"),
                (b"d", domain),
                (b"s", key.selector.encode("ascii")),
                (b"t", stamp),
                (b"h", b" : ".join(signed)),
                (b"bh", body_hash),
            ]
            # The b= tag on a line of its own after the others, folded once: what is hashed (b=
            # empty) is then, to the byte, the sent header with its b= value taken out.
            unsigned = b" " + dkim.fold(b"; ".join(b"=".join(tag) for tag in tags) + b";", len(_HEADER)) + b"\r\n b="
            hasher = hashlib.sha256()
            dkim.hash_headers(hasher, _RELAXED, canonical, signed, (_HEADER, unsigned), None)
            signature = base64.b64encode(key.sign(hasher.digest()))
            folded = b"\r\n ".join(signature[i : i + 72] for i in range(0, len(signature), 72))
            out.append(_HEADER + b":" + unsigned + folded + b"\r\n")
        return b"".join(out) + message


def _parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse``, whose regex split of every line of the body costs more than
    an Ed25519 signature; with CRLF line ends throughout (what we send) only the header block
    needs it, and the body is the bytes after the blank line."""
    end = message.find(b"\r\n\r\n")
    if end <= 0 or message.count(b"\n") != message.count(b"\r\n"):
        return dkim.rfc822_parse(message)
    headers, _ = dkim.rfc822_parse(message[: end + 2])
    return headers, message[end + 4 :]


def _relaxed_body(body: bytes) -> bytes:
    """dkimpy's relaxed body canonicalisation. Its whitespace rules rewrite every run of spaces
    with a regex; where they have nothing to change (no tab, no two spaces in a row, no space
    before a line end: our base64 and quoted-printable parts) only the trailing empty lines
    are dropped, the same bytes at a fraction of the cost."""
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        return _RELAXED.canonicalize_body(body)
    return canonicalization.correct_empty_body(canonicalization.strip_trailing_lines(body))


# --------------------------------------------------------------------------- keys


class _Unusable(DispatchError):
    """One key that cannot be used: the config key to fix and why."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def read_key(config: DkimConfig, algorithm: Algorithm, config_dir: Path, environ: Mapping[str, str]) -> PrivateKey:
    """The private key ``config`` names for ``algorithm``; raises _Unusable."""
    file: str | None = getattr(config, f"{algorithm}_key_file")
    var: str | None = getattr(config, f"{algorithm}_key_env")
    if file is not None:
        key = f"dkim.{algorithm}_key_file"
        path = Path(file) if os.path.isabs(file) else config_dir / file
        where = f"key file {path}"
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            raise _Unusable(key, f"{where} does not exist") from None
        except OSError as exc:
            raise _Unusable(key, f"{where} cannot be read: {exc.strerror}") from None
    else:
        key, where = f"dkim.{algorithm}_key_env", f"environment variable {var}"
        value = environ.get(var or "")
        if value is None or not value.strip():
            state = "not set" if value is None else "empty"
            raise _Unusable(key, f"{where} is {state}; set it to the PEM text of {_WHAT[algorithm]}")
        if "\n" not in value.strip():
            # An env file holds one line: accept the PEM with its line breaks written as \n.
            value = value.replace("\\n", "\n")
        pem = value.encode("ascii", "replace")
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise _Unusable(key, f"{where} holds an encrypted key; store it unencrypted, readable by us only") from None
    except (ValueError, UnsupportedAlgorithm):
        # Not chained: the parser's message may quote the data.
        raise _Unusable(key, f"{where} does not hold a PEM private key") from None
    wanted = rsa.RSAPrivateKey if algorithm == "rsa" else ed25519.Ed25519PrivateKey
    if not isinstance(private, wanted):
        raise _Unusable(key, f"{where} holds a key of another type; {_WHAT[algorithm]} is needed here")
    if isinstance(private, rsa.RSAPrivateKey) and private.key_size < MIN_RSA_BITS:
        raise _Unusable(key, f"{where} holds a {private.key_size}-bit RSA key; use {MIN_RSA_BITS} bits or more")
    return private


def _shown(section: Section, config_dir: Path, shown: str | None) -> str:
    return shown if shown is not None else f"{config_dir.name}/sections/{section.code}.toml"


def key_problems(
    section: Section, config_dir: Path, environ: Mapping[str, str], *, shown: str | None = None
) -> list[ConfigProblem]:
    """Every reason the section's DKIM keys cannot be used (none without a [dkim] table).

    ``shown``: the section file as messages name it (default ``config/sections/<code>.toml``).
    """
    if section.dkim is None:
        return []
    problems = []
    for algorithm in ("rsa", "ed25519"):
        try:
            read_key(section.dkim, algorithm, config_dir, environ)
        except _Unusable as exc:
            problems.append(ConfigProblem(_shown(section, config_dir, shown), exc.key, exc.message))
    return problems


def load_signer(
    section: Section,
    config_dir: Path,
    environ: Mapping[str, str],
    *,
    shown: str | None = None,
    clock: Callable[[], float] = time.time,
) -> DkimSigner | None:
    """The section's signer (None: it has no [dkim] table); raises ConfigError naming each
    key that cannot be used."""
    config = section.dkim
    if config is None:
        return None
    problems = key_problems(section, config_dir, environ, shown=shown)
    if problems:
        raise ConfigError(problems)
    keys = [
        SigningKey(config.rsa_selector, read_key(config, "rsa", config_dir, environ)),
        SigningKey(config.ed25519_selector, read_key(config, "ed25519", config_dir, environ)),
    ]
    return DkimSigner(ascii_domain(config.domain or section.sender.domain), keys, clock=clock)


class Signers:
    """Each section's signer, loaded once (keys are read at first use; a changed [dkim] table
    after a config reload loads afresh). Shared by the worker's threads."""

    def __init__(self, config_dir: Path, environ: Mapping[str, str]) -> None:
        self._config_dir = config_dir
        self._environ = environ
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, DkimConfig], DkimSigner] = {}

    def for_section(self, section: Section) -> DkimSigner | None:
        """Raises ConfigError when the section's keys cannot be used."""
        if section.dkim is None:
            return None
        cache_key = (section.code, section.dkim)
        signer = self._loaded.get(cache_key)
        if signer is None:
            with self._lock:
                signer = self._loaded.get(cache_key)
                if signer is None:
                    signer = load_signer(section, self._config_dir, self._environ)
                    assert signer is not None
                    self._loaded[cache_key] = signer
        return signer


# --------------------------------------------------------------------------- new keys


def generate_keys() -> tuple[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]:
    return rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS), ed25519.Ed25519PrivateKey.generate()


def private_pem(key: PrivateKey) -> bytes:
    encoding, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, pkcs8, serialization.NoEncryption())


def txt_value(key: PrivateKey) -> str:
    """The DKIM key record's text: ``v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo>`` or, RFC 8463,
    ``k=ed25519; p=<the raw 32-byte public key>``."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"


def zone_record(selector: str, domain: str, value: str) -> str:
    """The record as a zone file line: the name fully qualified, the text cut into strings of
    at most 255 characters (one TXT string cannot hold more; resolvers join them)."""
    strings = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"
