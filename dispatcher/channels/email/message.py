"""Build the email a target receives for one delivery.

Policy decision: messages are built 7-bit clean (``email.policy.SMTP`` with ``cte_type="7bit"``):
non-ASCII header text becomes RFC 2047 encoded words and non-ASCII bodies become base64 or
quoted-printable, whichever is shorter, all chosen by the standard library's policy. Such a
message passes any relay unchanged, with or without 8BITMIME/SMTPUTF8, and a DKIM signature
added by the relay survives re-encoding hops. We do not use SMTPUTF8: an address whose local
part is non-ASCII is refused (PermanentError); a non-ASCII domain is sent in its IDNA form.
"""

from __future__ import annotations

import email.errors
import email.policy
import re
from datetime import datetime
from email.headerregistry import Address, HeaderRegistry
from email.message import EmailMessage
from typing import NamedTuple

from dispatcher.channels.email.headers import ensure_header_safe
from dispatcher.config.models import Section
from dispatcher.errors import OperationalError, PermanentError


#: the policy messages are built with; serialise with ``email.policy.SMTP`` (CRLF line ends)
class _CachedHeaderRegistry(HeaderRegistry):
    """The stdlib registry builds a new header class with type() on every header it parses;
    a letter has about 17 of them and the worker builds hundreds of letters a second, so the
    classes are made once per header name (bench/steps.py: build_message about 40 % faster)."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


MESSAGE_POLICY = email.policy.SMTP.clone(cte_type="7bit", header_factory=_CachedHeaderRegistry())

# A delivery id goes into Message-ID's left-hand side and into file names: keep it dull.
_DELIVERY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# RFC 5646 in the loose form mail clients accept: "en", "de-CH", "zh-Hant-TW".
_LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*$")


def message_id_for(delivery_id: str, domain: str) -> str:
    """The Message-ID of a delivery: the same on every retry, so it doubles as a dedupe key."""
    if not _DELIVERY_ID.match(delivery_id):
        raise ValueError(f"delivery id {delivery_id!r} cannot go into a Message-ID")
    return f"<{delivery_id}@{_ascii_domain(domain)}>"


def build_message(
    *,
    delivery_id: str,
    section: Section,
    to_name: str,
    to_address: str,
    supporter_name: str,
    supporter_email: str,
    subject: str,
    text: str,
    html: str,
    language: str,
    date: datetime,
    message_id: str | None = None,
) -> EmailMessage:
    """The letter for one delivery, text and HTML, from the supporter via the section.

    Raises HeaderInjection for supporter input that could forge headers, PermanentError for a
    target or supporter address that cannot be sent to, OperationalError for a section sender
    that cannot be used. ValueError means the caller passed something no letter can carry
    (a naive date, a malformed delivery id or language tag): a bug, not a delivery outcome.
    """
    fields = letter_fields(
        delivery_id=delivery_id,
        section=section,
        to_name=to_name,
        to_address=to_address,
        supporter_name=supporter_name,
        supporter_email=supporter_email,
        subject=subject,
        language=language,
        date=date,
        message_id=message_id,
    )
    msg = EmailMessage(policy=MESSAGE_POLICY)
    msg["From"] = Address(display_name=fields.from_name, addr_spec=fields.from_address)
    msg["To"] = Address(display_name=fields.to_name, addr_spec=fields.to_address)
    msg["Reply-To"] = Address(display_name=fields.reply_to_name, addr_spec=fields.reply_to_address)
    msg["Subject"] = fields.subject
    msg["Date"] = date
    msg["Message-ID"] = fields.message_id
    msg["X-Dispatch-Delivery"] = delivery_id
    msg.set_content(text, subtype="plain", charset="utf-8")
    msg.add_alternative(html, subtype="html", charset="utf-8")
    # After set_content: it clears every Content-* header of the message it fills.
    msg["Content-Language"] = language
    return msg


class LetterFields(NamedTuple):
    """A letter's header values, checked: what :func:`build_message` and
    :func:`dispatcher.channels.email.mime.letter_bytes` put into the headers."""

    from_name: str
    from_address: str
    to_name: str
    to_address: str
    reply_to_name: str
    reply_to_address: str
    subject: str
    message_id: str


def letter_fields(
    *,
    delivery_id: str,
    section: Section,
    to_name: str,
    to_address: str,
    supporter_name: str,
    supporter_email: str,
    subject: str,
    language: str,
    date: datetime,
    message_id: str | None = None,
) -> LetterFields:
    """Every check :func:`build_message` documents, in its order; the values the headers carry."""
    # Supporter input first: refusing it must not depend on anything else being valid.
    ensure_header_safe(supporter_name, "supporter name")
    ensure_header_safe(supporter_email, "supporter email")
    # The rest comes from config and templates; checked anyway because a header is a header.
    ensure_header_safe(section.sender.name, "sender name")
    ensure_header_safe(to_name, "target name")
    ensure_header_safe(subject, "subject")

    if date.tzinfo is None or date.utcoffset() is None:
        raise ValueError("the Date header needs a timezone-aware datetime")
    if not _LANGUAGE_TAG.match(language):
        raise ValueError(f"language {language!r} is not a language tag")
    # The ledger's planned Message-ID when given: it stays the letter's key even if the section's
    # domain changed since the appeal came in.
    message_id = message_id or message_id_for(delivery_id, section.sender.domain)

    sender = section.sender
    supporter = _collapse(supporter_name)
    display = f"{supporter} via {_collapse(sender.name)}" if supporter else _collapse(sender.name)
    return LetterFields(
        from_name=display,
        from_address=_addr_spec(str(sender.address), "sender address", OperationalError),
        to_name=_collapse(to_name),
        to_address=_addr_spec(to_address, "target address", PermanentError),
        reply_to_name=supporter,
        reply_to_address=_addr_spec(supporter_email, "supporter email", PermanentError),
        subject=_collapse(subject),
        message_id=message_id,
    )


def _collapse(value: str) -> str:
    # Tabs and runs of spaces are legal in headers but only make display names look forged.
    return " ".join(value.split())


def _ascii_domain(domain: str) -> str:
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"domain {domain!r} has no IDNA form") from exc


#: RFC 5322 atext; a dot-atom of it is an address's local part that needs no quoting
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_PLAIN_ADDRESS = re.compile(
    rf"{_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z"
)


def _addr_spec(addr_spec: str, field: str, error: type[PermanentError | OperationalError]) -> str:
    """``addr_spec`` as it goes into the header (domain in IDNA form), or ``error``."""
    local, at, domain = addr_spec.strip().rpartition("@")
    if not at or not local or not domain:
        raise error(f"{field} is not an email address")
    if not local.isascii():
        # Would need SMTPUTF8 end to end, which we do not rely on (see the module docstring).
        raise error(f"{field} has a non-ASCII local part, which needs SMTPUTF8")
    try:
        plain = f"{local}@{_ascii_domain(domain)}"
        if _PLAIN_ADDRESS.match(plain):
            # a dot-atom at a host name: the stdlib parser accepts it as it is (and the email
            # package's parser is the slow part of a letter)
            return plain
        Address(addr_spec=plain)  # parses it: raises for what cannot be an address
        return plain
    except (ValueError, email.errors.HeaderParseError):
        # Not chained and not quoted: the address is personal data and errors reach the ledger.
        raise error(f"{field} is not a valid email address") from None
