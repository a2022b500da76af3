from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from typing import Any

import pytest

from dispatcher.channels.email.message import build_message, message_id_for
from dispatcher.errors import HeaderInjection, OperationalError, PermanentError
from tests.support.smtp import make_section

DATE = datetime(2024, 3, 5, 14, 30, 0, tzinfo=timezone(timedelta(hours=-5)))


def build(**overrides: Any) -> EmailMessage:
    args: dict[str, Any] = {
        "delivery_id": "d-0001",
        "section": make_section(),
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
    args.update(overrides)
    return build_message(**args)


def wire(message: EmailMessage) -> bytes:
    return message.as_bytes(policy=email.policy.SMTP)


def reparse(message: EmailMessage) -> EmailMessage:
    parsed = email.message_from_bytes(wire(message), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def raw_header(message: EmailMessage, name: str) -> str:
    """The header as it goes over the wire, unfolded."""
    head = wire(message).split(b"\r\n\r\n", 1)[0].decode("ascii")
    unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ")
    for line in unfolded.split("\r\n"):
        key, _, value = line.partition(": ")
        if key.lower() == name.lower():
            return value
    raise KeyError(name)


def test_headers_are_exact() -> None:
    msg = build()
    assert raw_header(msg, "From") == "Jane Doe via Amnesty International USA <appeals@aiusa.example.org>"
    assert raw_header(msg, "To") == "Ambassador Jane Smith <ambassador@embassy.example.org>"
    assert raw_header(msg, "Reply-To") == "Jane Doe <jane@example.net>"
    assert raw_header(msg, "Subject") == "Free the detained activists"
    assert raw_header(msg, "Message-ID") == "<d-0001@aiusa.example.org>"
    assert raw_header(msg, "Content-Language") == "en"
    assert raw_header(msg, "X-Dispatch-Delivery") == "d-0001"
    assert raw_header(msg, "Date") == "Tue, 05 Mar 2024 14:30:00 -0500"


def test_message_id_is_stable_across_builds() -> None:
    first = build(date=DATE)
    retry = build(date=DATE + timedelta(hours=3), text="re-rendered")
    assert first["Message-ID"] == retry["Message-ID"] == message_id_for("d-0001", "aiusa.example.org")


def test_is_seven_bit_clean_and_crlf() -> None:
    data = wire(build(supporter_name="Zoë Müller", text="Sehr geehrte Frau Botschafterin, ÄÖÜ ß\n"))
    assert data.isascii()
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


@pytest.mark.parametrize(
    "name",
    ["Zoë Müller", "Анна Петрова", "李小龙", "Seán O'Brien, Jr.", 'Anna "Nina" Kowalska', "Ñandú (Buenos Aires)"],
)
def test_names_round_trip_through_the_wire(name: str) -> None:
    parsed = reparse(build(supporter_name=name))
    sender = parsed["From"].addresses[0]
    assert sender.display_name == f"{name} via Amnesty International USA"
    assert sender.addr_spec == "appeals@aiusa.example.org"
    reply_to = parsed["Reply-To"].addresses[0]
    assert (reply_to.display_name, reply_to.addr_spec) == (name, "jane@example.net")


def test_non_ascii_names_are_encoded_words_by_the_policy() -> None:
    from_header = raw_header(build(supporter_name="Zoë Müller"), "From")
    assert from_header.startswith("=?utf-8?")
    assert from_header.endswith("<appeals@aiusa.example.org>")


def test_non_ascii_target_and_subject_round_trip() -> None:
    parsed = reparse(build(to_name="Президент Республики", subject="Освободите активистов — срочно"))
    assert parsed["To"].addresses[0].display_name == "Президент Республики"
    assert str(parsed["Subject"]) == "Освободите активистов — срочно"


def test_text_and_html_alternatives() -> None:
    parsed = reparse(build(text="Привет, мир\n.a line starting with a dot\n", html="<p>Zoë</p>"))
    assert parsed.get_content_type() == "multipart/alternative"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in parts)
    plain = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content().replace("\r\n", "\n") == "Привет, мир\n.a line starting with a dot\n"
    assert html.get_content().strip() == "<p>Zoë</p>"


def test_supporter_name_is_whitespace_collapsed() -> None:
    parsed = reparse(build(supporter_name="  Jane \t  Doe "))
    assert parsed["From"].addresses[0].display_name == "Jane Doe via Amnesty International USA"


@pytest.mark.parametrize(
    "name",
    [
        "Jane\r\nBcc: victim@example.org",
        "Jane\nDoe",
        "Jane\rDoe",
        "Jane\x00Doe",
        "Jane\u2028Doe",
        "Jane\u202eeoD",
        "=?utf-8?q?President?=",
        "Jane =?utf-8?b?QWRtaW4=?=",
    ],
)
def test_unsafe_supporter_names_are_refused(name: str) -> None:
    with pytest.raises(HeaderInjection):
        build(supporter_name=name)


@pytest.mark.parametrize("address", ["jane@example.net\r\nBcc: x@example.org", "jane@exa\nmple.net", "=?x?@y.org"])
def test_unsafe_supporter_emails_are_refused(address: str) -> None:
    with pytest.raises(HeaderInjection):
        build(supporter_email=address)


def test_header_injection_is_permanent_and_does_not_echo_the_value() -> None:
    with pytest.raises(PermanentError) as info:
        build(supporter_name="Jane\r\nBcc: victim@example.org")
    assert "victim" not in str(info.value)


@pytest.mark.parametrize("address", ["not-an-address", "a b@example.org", "@example.org", "jane@"])
def test_malformed_supporter_email_is_permanent(address: str) -> None:
    with pytest.raises(PermanentError) as info:
        build(supporter_email=address)
    assert address not in str(info.value)


def test_non_ascii_local_part_needs_smtputf8_and_is_refused() -> None:
    with pytest.raises(PermanentError, match="SMTPUTF8"):
        build(to_address="président@élysée.example.org")


def test_idn_domain_goes_out_in_idna_form() -> None:
    parsed = reparse(build(to_address="office@bücher.example.org"))
    assert parsed["To"].addresses[0].addr_spec == "office@xn--bcher-kva.example.org"


def test_sender_address_needing_smtputf8_is_operational() -> None:
    # Valid config (email-validator allows it), but unusable without SMTPUTF8: our side to fix.
    section = make_section(sender_address="présidence@aiusa.example.org", envelope=None)
    with pytest.raises(OperationalError, match="sender address"):
        build(section=section)


def test_naive_date_and_bad_ids_are_bugs() -> None:
    with pytest.raises(ValueError, match="timezone"):
        build(date=datetime(2024, 3, 5, 12, 0))
    with pytest.raises(ValueError, match="delivery id"):
        build(delivery_id="d 1@evil")
    with pytest.raises(ValueError, match="language"):
        build(language="en\r\nX: y")


def test_utc_date_and_regional_language_tag() -> None:
    msg = build(date=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), language="de-CH")
    assert raw_header(msg, "Date") == "Tue, 02 Jan 2024 03:04:05 +0000"
    assert raw_header(msg, "Content-Language") == "de-CH"


def test_supporter_without_a_name_writes_as_the_section() -> None:
    parsed = reparse(build(supporter_name="   "))
    assert parsed["From"].addresses[0].display_name == "Amnesty International USA"
