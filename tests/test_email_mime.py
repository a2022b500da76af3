"""The letter's bytes as the worker makes them (mime.letter_bytes) are the email package's bytes.

Each case builds the same letter both ways — ``build_message(...).as_bytes(MESSAGE_POLICY)``,
the reference, and ``letter_bytes(...)`` — and checks that either both refuse it with the same
error, or the bytes are identical (the multipart boundary is random: it is compared apart) and
the stdlib parser reads from ours the same header values and body parts the reference carries.
"""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dispatcher.channels.email.message import MESSAGE_POLICY, build_message
from dispatcher.channels.email.mime import letter_bytes
from dispatcher.errors import HeaderInjection, PermanentError
from tests.support.smtp import make_section

DATE = datetime(2024, 3, 5, 14, 30, 0, tzinfo=timezone(timedelta(hours=-5)))
BOUNDARY = re.compile(rb'boundary="([^"]+)"')

BASE: dict[str, Any] = {
    "delivery_id": "d-0001",
    "to_name": "Ambassador Jane Smith",
    "to_address": "ambassador@embassy.example.org",
    "supporter_name": "Jane Doe",
    "supporter_email": "jane@example.net",
    "subject": "Free the detained activists",
    "text": "Dear Ambassador,\n\nPlease act.\n",
    "html": "<p>Dear Ambassador,</p><p>Please act.</p>",
    "language": "en",
    "date": DATE,
}


def both(sender_name: str = "Amnesty International USA", **overrides: Any) -> tuple[bytes, bytes] | Exception:
    """(reference bytes, ours) for the same letter, or the error both raised alike."""
    args = {**BASE, "section": make_section(sender_name=sender_name), **overrides}
    try:
        reference = build_message(**args).as_bytes(policy=MESSAGE_POLICY)
    except Exception as exc:  # noqa: BLE001 - whatever it is, ours must raise the same
        with pytest.raises(type(exc)) as ours_refused:
            letter_bytes(**args)
        assert str(ours_refused.value) == str(exc)
        return exc
    return reference, letter_bytes(**args)


def same_letter(reference: bytes, ours: bytes) -> None:
    ref_boundary = BOUNDARY.search(reference)
    our_boundary = BOUNDARY.search(ours)
    assert ref_boundary is not None and our_boundary is not None
    # the boundary is random on both sides; it must not be a line of the parts
    assert ours.count(b"--" + our_boundary.group(1)) == 3
    assert ours.replace(our_boundary.group(1), b"BOUNDARY") == reference.replace(ref_boundary.group(1), b"BOUNDARY")
    assert ours.isascii()
    assert max(len(line) for line in ours.split(b"\r\n")) <= 998
    assert b"\n" not in ours.replace(b"\r\n", b"")
    mine, theirs = parse(ours), parse(reference)
    for name in ("From", "To", "Reply-To", "Subject", "Date", "Message-ID", "X-Dispatch-Delivery", "Content-Language"):
        assert str(mine[name]) == str(theirs[name]), name
    mine_parts = [p.get_content() for p in mine.iter_parts()]  # type: ignore[attr-defined]
    assert mine_parts == [p.get_content() for p in theirs.iter_parts()]  # type: ignore[attr-defined]
    assert [p.get_content_type() for p in mine.iter_parts()] == ["text/plain", "text/html"]


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def check(**overrides: Any) -> Exception | None:
    """None when both made the same letter, else the error both raised alike."""
    made = both(**overrides)
    if isinstance(made, Exception):
        return made
    same_letter(*made)
    return None


TRICKY_NAMES = [
    "Jane Doe",
    "",
    "Zoë Müller",
    "J. R. R. Tolkien",
    'Jane "JD" Doe',
    "O'Brien, Pat",
    "محمد بن سلمان",  # RTL
    "אבי כהן",
    "\u202eevil\u202c",  # a bidi override: refused
    "Kim 😀🏳️‍🌈",
    "李小龙",
    "Ωmega (the last)",
    "x" * 120,
    "Jean-Baptiste Emmanuel Zorg de la Très Longue Famille Aristocratique du Sud-Ouest",
    "a=?utf-8?q?forged?=",  # an encoded word: refused
    "Eve\r\nBcc: victim@example.org",  # header injection: refused
    "tab\there",
]


@pytest.mark.parametrize("name", TRICKY_NAMES)
def test_tricky_supporter_names(name: str) -> None:
    check(supporter_name=name)


@pytest.mark.parametrize(
    "subject",
    [
        "Free the detained activists",
        "Chechnya: investigate the homophobic detentions, torture and killings of gay men now, please",
        "Свобода " * 14,
        "إطلاق سراح المعتقلين فوراً",
        "✊ Free them ✊",
        "Subject\nBcc: x@example.org",
        "a" * 200,
        "  spaced   out  ",
    ],
)
def test_tricky_subjects(subject: str) -> None:
    check(subject=subject)


@pytest.mark.parametrize(
    "overrides",
    [
        {"sender_name": "Amnesty International Österreich"},
        {"sender_name": "Sección Española de Amnistía Internacional, una organización muy larga"},
        {"to_name": "Его Превосходительство Посол"},
        {"to_name": "Dr. Smith, Jr."},
        {"to_address": "ambassador@bücher.example"},
        {"to_address": "not-an-address"},
        {"supporter_email": "jöe@example.net"},
        {"supporter_email": '"odd local"@example.net'},
        {"supporter_email": "a..b@example.net"},
        {"supporter_email": "user+tag@sub.example.net"},
        {"language": "de-CH"},
        {"date": datetime(2025, 1, 1, 0, 0, 0, tzinfo=UTC)},
        {"message_id": "<planned.id-1@other.example.org>"},
        {"text": "Ünïcödé body\nwith lines\n" * 20},
        {"text": "x" * 500 + "\n"},
        {"text": "--===============1234567890123456789==\nlooks like a boundary\n"},
        {"text": ""},
        {"text": "no final newline"},
        {"text": "From the start\r\nCRLF lines\rand a CR\n"},
        {"html": "<p>" + "مرحبا " * 200 + "</p>"},
        {"html": "<p>😀</p>\n" * 30},
        # quoted-printable: long lines split by soft breaks, never inside an escape; trailing
        # white space quoted, at every length around the limit
        {"text": ("The authorities’ failure – “to investigate” = none. " * 30 + "\n\n") * 6},
        *({"text": "ü" + "x" * n + "=é" * 3 + "\n"} for n in range(70, 80)),
        *({"text": "ü" + "y" * n + end + "\n" * 12} for n in range(72, 80) for end in (" ", "\t", "  \t")),
        {"text": "é\n" + "\n".join("z" * n + " " for n in range(60, 170)) + "\n"},
        {"text": "Ünïcödé\x0b\x0c\x1c\x1d\x1e\x85\u2028 line breaks of str.splitlines\n" * 3},
    ],
)
def test_tricky_letters(overrides: dict[str, Any]) -> None:
    check(**overrides)


def test_refusals_are_the_same() -> None:
    assert isinstance(check(supporter_name="Eve\nBcc: victim@example.org"), HeaderInjection)
    assert isinstance(check(supporter_name="\u202eevil"), HeaderInjection)
    assert isinstance(check(subject="=?utf-8?q?forged?="), HeaderInjection)
    assert isinstance(check(supporter_email="jöe@example.net"), PermanentError)
    assert isinstance(check(to_address="nobody"), PermanentError)
    assert isinstance(check(date=datetime(2024, 1, 1)), ValueError)  # naive


def test_the_plain_letter_is_not_refused() -> None:
    assert check() is None
    assert check(supporter_name="Zoë Müller", subject="Свобода") is None


# Mostly text a header may carry (the refusals have their own tests above): letters of every
# script, punctuation, symbols and emoji, spaces and tabs.
header_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Cf", "Zl", "Zp"), whitelist_characters="\t"),
    max_size=90,
)
body_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=1500)
#: mostly what quoted-printable splits and quotes: long runs, "=", white space, line ends
qp_text = st.lists(
    st.sampled_from(["a", "word ", "=", " ", "\t", "\n", "\r\n", "é", "’", "\x0c", "\x85", "😀"]).flatmap(
        lambda piece: st.integers(1, 90).map(lambda n: piece * n)
    ),
    max_size=30,
).map("".join)
local_part = st.from_regex(r"\A[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\"-]{1,20}\Z")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    supporter_name=header_text,
    sender_name=header_text.filter(lambda s: s.strip() != ""),
    to_name=header_text,
    subject=header_text,
    local=local_part,
    text=body_text,
    html=body_text,
)
@example(
    supporter_name="Zoë 😀 محمد",
    sender_name="Amnesty",
    to_name="Minister",
    subject="Ünïcödé",
    local="jane",
    text="ü\n" * 11,
    html="<p>x</p>",
)
def test_any_letter_is_the_email_packages_letter(
    supporter_name: str, sender_name: str, to_name: str, subject: str, local: str, text: str, html: str
) -> None:
    check(
        supporter_name=supporter_name,
        sender_name=sender_name,
        to_name=to_name,
        subject=subject,
        supporter_email=f"{local}@example.net",
        text=text,
        html=html,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=qp_text, html=qp_text)
def test_any_quoted_printable_body_is_the_email_packages(text: str, html: str) -> None:
    check(text=text, html=html)
