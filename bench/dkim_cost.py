"""What DKIM costs per letter, by algorithm and by implementation.

Typical letters: UA 002/19 (-DEMO copy) from section us to the ambassador in Washington,
rendered by the real templates with a short personal message and built by ``build_message``,
``--letters`` of them with different supporters. Each row times one step over all of them,
``--rounds`` times after a warm-up, and shows the median in µs per letter:

* serialise: ``as_bytes`` with the message policy, what the channel does for every letter, signed
  or not (the baseline);
* dkimpy rsa-sha256 / ed25519-sha256: ``dkim.sign`` as shipped (pure-Python RSA; PyNaCl for
  Ed25519), relaxed/relaxed, our header list; a fresh DKIM object per letter, as ``dkim.sign`` does;
* ours: dispatcher/channels/email/dkim.py (dkimpy's canonicalisation and headers, OpenSSL's
  signatures through ``cryptography``) with the RSA key, the Ed25519 key, and both (what is sent);
* the bare OpenSSL operations on a digest, for what is left that is not the signature.

One thread, nothing else of ours running. No assertions: docs/benchmarks.md quotes the figures.

    .venv/bin/python bench/dkim_cost.py [--letters 50] [--rounds 9]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

# Not bench/dkim.py: with bench/ first on the path, every "import dkim" would find this file.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dkim as dkimpy  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dispatcher.channels.email import dkim  # noqa: E402
from dispatcher.channels.email.message import MESSAGE_POLICY, build_message  # noqa: E402
from dispatcher.config.loader import load_catalog  # noqa: E402
from dispatcher.render.letters import LetterRequest, Renderer, Supporter  # noqa: E402

CAMPAIGN = "UA-002-19-DEMO"
SECTION = "us"
TARGET = "ambassador-us"
NAMES = ("Jane Doe", "Zoë Müller", "Søren Ødegård", "María José García", "Li Wei")

T = TypeVar("T")


def letters(count: int) -> list[EmailMessage]:
    catalog = load_catalog(ROOT / "config", ROOT / "templates").with_demo_copies(date.today())
    renderer = Renderer(ROOT / "templates")
    section = catalog.section(SECTION)
    target = catalog.target(CAMPAIGN, SECTION, TARGET)
    out = []
    for i in range(count):
        name = f"{NAMES[i % len(NAMES)]} {i}"
        email = f"supporter{i}@example.org"
        rendered = renderer.render_email(
            LetterRequest(
                campaign=catalog.campaign(CAMPAIGN),
                section=section,
                target=target,
                language="en",
                supporter=Supporter(name, email, "Boston", "US"),
                message="I am writing to add my voice to this appeal.\n\nPlease act without delay.",
                date=date.today(),
            )
        )
        message = build_message(
            delivery_id=f"dl_bench{i:05d}",
            section=section,
            to_name=target.name,
            to_address=str(target.email),
            supporter_name=name,
            supporter_email=email,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            language=rendered.language,
            date=datetime.now(UTC),
        )
        out.append(message)
    return out


def per_letter_us(step: Callable[[T], object], items: Sequence[T], rounds: int) -> float:
    for item in items[:3]:
        step(item)  # warm-up
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for item in items:
            step(item)
        samples.append((time.perf_counter() - started) / len(items) * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--letters", type=int, default=50, help="distinct letters per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds; the median is shown")
    args = parser.parse_args()

    catalog = load_catalog(ROOT / "config", ROOT / "templates").with_demo_copies(date.today())
    domain = catalog.section(SECTION).sender.domain
    messages = letters(args.letters)
    data = [message.as_bytes(policy=MESSAGE_POLICY) for message in messages]

    rsa_key, ed25519_key = dkim.generate_keys()
    rsa_pkcs1 = rsa_key.private_bytes(  # dkimpy reads PKCS#1 only
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    ed25519_seed = ed25519_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    ed25519_b64 = base64.b64encode(ed25519_seed)
    headers = list(dkim.SIGNED_HEADERS)
    ours_rsa = dkim.DkimSigner(domain, [dkim.SigningKey("rsa", rsa_key)])
    ours_ed25519 = dkim.DkimSigner(domain, [dkim.SigningKey("ed", ed25519_key)])
    ours_both = dkim.DkimSigner(domain, [dkim.SigningKey("rsa", rsa_key), dkim.SigningKey("ed", ed25519_key)])
    digest = hashlib.sha256(b"headers").digest()

    def dkimpy_sign(algorithm: bytes, key: bytes) -> Callable[[bytes], object]:
        return lambda message: dkimpy.sign(
            message,
            b"sel",
            domain.encode(),
            key,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=algorithm,
            include_headers=[h for h in headers if h.lower() in message.lower()],
        )

    def openssl_rsa(message: bytes) -> object:
        return rsa_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))

    rows: list[tuple[str, Callable[[Any], object], Sequence[Any]]] = [
        ("serialise (as_bytes; the baseline, unsigned)", lambda m: m.as_bytes(policy=MESSAGE_POLICY), messages),
        ("dkimpy rsa-sha256 (pure Python RSA)", dkimpy_sign(b"rsa-sha256", rsa_pkcs1), data),
        ("dkimpy ed25519-sha256 (PyNaCl)", dkimpy_sign(b"ed25519-sha256", ed25519_b64), data),
        ("ours rsa-sha256 (OpenSSL)", ours_rsa.sign, data),
        ("ours ed25519-sha256 (OpenSSL)", ours_ed25519.sign, data),
        ("ours, both (what is sent)", ours_both.sign, data),
        ("  of which the RSA-2048 signature (OpenSSL)", openssl_rsa, data),
        ("  of which the Ed25519 signature (OpenSSL)", lambda m: ed25519_key.sign(digest), data),
    ]
    results = {label: per_letter_us(step, items, args.rounds) for label, step, items in rows}

    baseline = results[rows[0][0]]
    pure = results[rows[1][0]]
    size = statistics.median(len(m) for m in data)
    table = Table(
        title=f"DKIM per letter: median of {args.rounds} rounds × {len(data)} letters ({size:.0f} bytes), one thread; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    for column in ("step", "µs / letter", "× serialise", "× dkimpy RSA"):
        table.add_column(column, justify="left" if column == "step" else "right", no_wrap=True)
    for label, _, _ in rows:
        value = results[label]
        table.add_row(label, f"{value:,.0f}", f"{value / baseline:.2f}", f"{value / pure:.3f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
