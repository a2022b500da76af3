"""Read what comes back to a letter's VERP address: a bounce, a delay warning, an auto-reply.

:func:`read_bounce` turns the raw mail into :class:`BounceFacts` and keeps nothing else: the
kind, the status, the far side's diagnostic, the reporting and remote MTAs, the official's
address that failed, when, and the ways back to the letter (VERP candidates, the original's
Message-ID, the DSN's envelope id). The supporter's message, name and address never leave this
module: the original letter a bounce carries is read only for its Message-ID and Return-Path.

How a message is read, first match wins:

1. **An RFC 3464 report** (``message/delivery-status``, or ``message/global-delivery-status``
   of RFC 6533) is read with the standard library: per-message fields (Reporting-MTA,
   Arrival-Date, Original-Envelope-Id), then each recipient's block (Action, Status,
   Diagnostic-Code, Remote-MTA, Last-Attempt-Date). The worst block decides. Postfix, Exim 4,
   Exchange/Microsoft 365 and Gmail all send these.
2. **A mail system's notice without one** (From MAILER-DAEMON or postmaster, an
   X-Failed-Recipients header, a "delivery failed" subject): flufl.bounce's detectors (qmail's
   QSBMF, old Exim, the heuristics) find the failed address; a permanent failure is ``hard``
   with no status, a temporary one ``delayed``. A notice nobody can read is ``unreadable``.
3. **An auto-reply** (RFC 3834 ``Auto-Submitted`` other than ``no``, ``X-Autoreply``,
   ``X-Autorespond``, ``Precedence: auto_reply``, or an out-of-office subject in English,
   German, French, Spanish, Italian, Dutch or Russian): ``auto_reply``, which means the mailbox
   exists. Never a bounce. Mail systems mark their bounces ``Auto-Submitted: auto-replied`` too
   (Postfix and Exim do), which is why the two steps above come first.
4. Anything else (an official's human answer, spam to the bounce address) is ``not_a_bounce``.

| Action (RFC 3464)       | Status                      | kind      |
| ----------------------- | --------------------------- | --------- |
| failed                  | 5.x.x (but 5.2.2)           | hard      |
| failed                  | 4.x.x, or 5.2.2 (mailbox full) | soft   |
| failed                  | none                        | hard      |
| delayed                 | any                         | delayed   |
| delivered/relayed/expanded | any                      | not_a_bounce |

**Bad input never raises.** Malformed MIME, a delivery-status part full of garbage, headers the
email package chokes on: the result is ``unreadable`` with a ``reason`` (and a
``bounce.unreadable`` log line), so a listener can count it, drop it and go on with the next.

**Size.** Only the first ``max_bytes`` (256 KiB by default) go to the parser. Every MTA puts the
human text and the delivery-status part before the returned original, so a 10 MB bounce (the
original came back whole, attachments and all) is still read from its head. A caller that read
only the head itself passes ``cut=True``; either way the facts say ``truncated``.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email import policy
from email.errors import HeaderParseError
from email.header import Header, decode_header
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser, HeaderParser
from email.utils import getaddresses, parsedate_to_datetime
from enum import StrEnum
from typing import Any

from flufl.bounce import all_failures

from dispatcher.logging import get_logger

log = get_logger(__name__)

#: the head of a bounce that is parsed; the facts are always in it (real bounces put them in
#: the first 20-50 KB), and the email package's worst cases on crafted input grow with the
#: square of the size: 256 KiB keeps the worst one measured under a second
MAX_BYTES = 256 * 1024
#: lines that may be MIME boundaries; real bounces have a handful of parts, and each part costs
#: a walk of the tree in every detector (150,000 empty parts in 750 KB took 27 s)
MAX_BOUNDARIES = 200
#: the far side's diagnostic is kept to this many characters
DIAGNOSTIC_CHARS = 300


class BounceKind(StrEnum):
    HARD = "hard"  # this address will not take this letter: 5.x.x
    SOFT = "soft"  # the relay gave up for a reason that may pass (mailbox full)
    DELAYED = "delayed"  # a warning: the relay still tries
    AUTO_REPLY = "auto_reply"  # someone's robot answered: the mailbox exists
    NOT_A_BOUNCE = "not_a_bounce"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class BounceFacts:
    """All that is kept of a message that came back. Nothing here is a supporter's data.

    ``recipient`` is the official's address that failed (Original-Recipient, else
    Final-Recipient, else what flufl.bounce found). ``reported_at`` is Last-Attempt-Date, else
    the bounce's Date, else Arrival-Date. ``verp_candidates`` are the addresses that may carry
    a VERP token, best first: the envelope recipients when the caller knows them, else
    Delivered-To, X-Original-To, Envelope-To, To, then the returned original's Return-Path.
    ``original_message_id`` and ``envelope_id`` (the DSN's Original-Envelope-Id, our ENVID)
    are further ways to find the letter when no token reads. ``reason`` says why a message is
    ``unreadable`` or ``not_a_bounce``, for the log and the counters.
    """

    kind: BounceKind
    status: str | None = None
    action: str | None = None
    diagnostic: str | None = None
    reporting_mta: str | None = None
    remote_mta: str | None = None
    recipient: str | None = None
    reported_at: datetime | None = None
    verp_candidates: tuple[str, ...] = ()
    original_message_id: str | None = None
    envelope_id: str | None = None
    truncated: bool = False
    reason: str | None = None

    @property
    def is_bounce(self) -> bool:
        """A failure of the letter (hard or soft), as opposed to a warning or an answer."""
        return self.kind in (BounceKind.HARD, BounceKind.SOFT)

    @property
    def suppresses_address(self) -> bool:
        return self.kind is BounceKind.HARD and suppresses_address(self.status)

    def log_fields(self) -> dict[str, Any]:
        """The facts as log fields (all of them are safe to log: none is a supporter's)."""
        fields = {
            "kind": str(self.kind),
            "status": self.status,
            "action": self.action,
            "diagnostic": self.diagnostic,
            "reporting_mta": self.reporting_mta,
            "remote_mta": self.remote_mta,
            "recipient": self.recipient,
            "reported_at": self.reported_at.isoformat() if self.reported_at else None,
            "truncated": self.truncated or None,
            "reason": self.reason,
        }
        return {k: v for k, v in fields.items() if v is not None}


# --------------------------------------------------------------------------- statuses

_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_REPLY_STATUS = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def classify_status(status: str) -> BounceKind:
    """``hard`` or ``soft`` for a failure with this enhanced status code (RFC 3463).

    5.x.x is hard and 4.x.x soft, except 5.2.2 (mailbox full), which is soft: RFC 3463 calls
    it persistent, but a full mailbox is emptied sooner or later, and an official's office
    whose inbox overflowed during a campaign is exactly the address we must not give up on.
    """
    match = _STATUS.search(status)
    if match is None:
        raise ValueError(f"not an enhanced status code: {status[:20]!r}")
    klass, subject, detail = match.groups()
    if klass == "5" and (subject, detail) != ("2", "2"):
        return BounceKind.HARD
    return BounceKind.SOFT


def classify_reply(code: int, text: str) -> BounceKind:
    """``hard`` or ``soft`` for a synchronous SMTP refusal (``550``, ``"5.1.1 <x>: unknown"``).

    The enhanced status at the start of the text decides when there is one and it agrees
    with the reply code (RFC 2034); otherwise the code does: 4xx soft, 5xx hard, except 552
    ("exceeded storage allocation", RFC 5321), which is a full mailbox. Raises ValueError for
    a code that is not a refusal.
    """
    if not 400 <= code < 600:
        raise ValueError(f"{code} is not a refusal")
    match = _REPLY_STATUS.match(text or "")
    if match is not None and match.group(1) == str(code)[0]:
        return classify_status(".".join(match.groups()))
    if code >= 500 and code != 552:
        return BounceKind.HARD
    return BounceKind.SOFT


def reply_status(text: str) -> str | None:
    """The enhanced status code a reply's text starts with (``"5.1.1"``), if any."""
    match = _REPLY_STATUS.match(text or "")
    return ".".join(match.groups()) if match else None


#: 5.1.x codes that are about our sender, not the address we wrote to (RFC 3463, RFC 3886)
_SENDER_SIDE = frozenset({"7", "8", "9"})


def suppresses_address(status: str | None) -> bool:
    """Whether a hard failure with ``status`` means the address itself is dead.

    Only 5.1.x says so: the destination address is wrong (5.1.1 no such user, 5.1.2 no such
    domain, 5.1.3 bad syntax, 5.1.6 moved, 5.1.10 null MX / Microsoft's RecipientNotFound),
    except 5.1.7-5.1.9, which are about our sender. Everything else is a failure of this
    letter, not of the address: 5.7.x (rejected as spam, DMARC or SPF, not authorised to send
    there) is about us or our content, 5.2.x about the mailbox's state, 5.3.x/5.6.x about the
    message, 5.4.x about routing — suppressing the office for those would silence it for
    every later campaign because of one policy refusal. 4.x.x and a missing status never
    suppress.
    """
    if not status:
        return False
    match = _STATUS.search(status)
    if match is None:
        return False
    klass, subject, detail = match.groups()
    return klass == "5" and subject == "1" and detail not in _SENDER_SIDE


# --------------------------------------------------------------------------- reading


def read_bounce(
    raw: bytes,
    *,
    envelope_recipients: Iterable[str] | None = None,
    max_bytes: int = MAX_BYTES,
    cut: bool = False,
) -> BounceFacts:
    """The facts of a message that came back to a bounce address; never raises on bad input.

    ``envelope_recipients`` are the RCPT TO addresses of the SMTP/LMTP session that brought
    it, when the caller has them (the most trustworthy VERP candidates). ``cut`` says the
    caller passes only the head of a longer message.
    """
    truncated = cut or len(raw) > max_bytes
    head = raw[:max_bytes]
    envelope = tuple(a.strip() for a in envelope_recipients or () if a and a.strip())
    if head.count(b"\n--") > MAX_BOUNDARIES:
        return _unreadable("too many MIME parts", truncated, envelope, len(raw))
    try:
        # compat32, not policy.default: the default policy's structured header parser is
        # quadratic on crafted headers (a Content-Type with 40,000 parameters took 25 s; 0.5 s
        # here), and flufl.bounce's detectors expect this model anyway.
        msg = BytesParser(policy=policy.compat32).parsebytes(head)
        facts = _read(msg)
        candidates = _dedupe([*envelope] if envelope else [*_header_candidates(msg), *_original_return_path(msg)])
        message_id = _original_message_id(msg)
    except Exception as exc:  # noqa: BLE001 - any byte string is a possible bounce; none may stop the listener
        return _unreadable(f"the email package failed: {type(exc).__name__}", truncated, envelope, len(raw))
    if facts.kind is BounceKind.UNREADABLE:
        log.warning("bounce.unreadable", reason=facts.reason, size=len(raw), truncated=truncated)
    return replace(facts, verp_candidates=candidates, original_message_id=message_id, truncated=truncated)


def _read(msg: Message) -> BounceFacts:
    reports = [p for p in msg.walk() if p.get_content_type() in _DSN_TYPES]
    if reports:
        facts = _from_reports(msg, reports)
        if facts is not None:
            return facts
    if reports or _is_system_notice(msg):
        return _from_heuristics(msg, had_report=bool(reports))
    if _is_auto_reply(msg):
        return BounceFacts(BounceKind.AUTO_REPLY, reported_at=_date(msg.get("Date")))
    return BounceFacts(BounceKind.NOT_A_BOUNCE, reason="neither a delivery report nor an auto-reply")


# ---- RFC 3464

_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_FAILED = ("failed", "error")  # OpenSMTPD has been seen writing "error"
_POSITIVE = ("delivered", "relayed", "expanded")


def _from_reports(msg: Message, reports: list[Message]) -> BounceFacts | None:
    per_message: dict[str, str] = {}
    recipients: list[dict[str, str]] = []
    for part in reports:
        for block in _blocks(part):
            fields = {k.lower(): _flat(v) for k, v in block.items()}
            if "action" in fields or "final-recipient" in fields or "status" in fields:
                recipients.append(fields)
            else:
                for key, value in fields.items():
                    per_message.setdefault(key, value)
    read = [(kind, fields) for fields in recipients if (kind := _kind_of(fields)) is not None]
    if not read:
        return None
    # One letter has one recipient; should a report cover several, the worst one decides.
    kind, fields = max(read, key=lambda r: _RANK[r[0]])
    recipient = _typed(fields.get("original-recipient")) or _typed(fields.get("final-recipient"))
    recipient = _address(recipient)
    return BounceFacts(
        kind,
        status=_status_of(fields),
        action=_first_word(fields.get("action")),
        diagnostic=_diagnostic(fields.get("diagnostic-code"), recipient),
        reporting_mta=_host(per_message.get("reporting-mta")),
        remote_mta=_host(fields.get("remote-mta")),
        recipient=recipient,
        reported_at=_date(fields.get("last-attempt-date"))
        or _date(msg.get("Date"))
        or _date(per_message.get("arrival-date")),
        envelope_id=_short(per_message.get("original-envelope-id"), 100),
        reason="a positive delivery report" if kind is BounceKind.NOT_A_BOUNCE else None,
    )


_RANK = {BounceKind.NOT_A_BOUNCE: 0, BounceKind.DELAYED: 1, BounceKind.SOFT: 2, BounceKind.HARD: 3}


def _kind_of(fields: dict[str, str]) -> BounceKind | None:
    """The block's kind, or None for a block that does not say whom it is about or whose
    Status is garbage (both are required by RFC 3464: such a block is not evidence)."""
    action = _first_word(fields.get("action")) or ""
    status = _status_of(fields)
    if not _address(_typed(fields.get("final-recipient")) or _typed(fields.get("original-recipient"))):
        return None
    if fields.get("status") and status is None:
        return None
    if not action and status and status.startswith("5"):
        action = "failed"  # Action is required; a block with a permanent status and none failed
    if action.startswith(_FAILED):
        return classify_status(status) if status else BounceKind.HARD
    if action.startswith("delayed"):
        return BounceKind.DELAYED
    if action.startswith(_POSITIVE):
        return BounceKind.NOT_A_BOUNCE
    return None


def _status_of(fields: dict[str, str]) -> str | None:
    status = _STATUS.search(fields.get("status") or "")
    detail = _STATUS.search(fields.get("diagnostic-code") or "")
    if status is None:
        return detail.group(0) if detail else None
    # Some MTAs write only "5.0.0" in Status and the real code in the diagnostic.
    generic = status.group(2) == "0" and status.group(3) == "0"
    if generic and detail is not None and detail.group(1) == status.group(1):
        return detail.group(0)
    return status.group(0)


def _blocks(part: Message) -> Iterator[Message]:
    """The header blocks of a delivery-status part, however the email package left them."""
    payload = part.get_payload()
    if isinstance(payload, list):
        for block in payload:
            if isinstance(block, Message):
                yield block
                # message/global-delivery-status is parsed as one message: the per-message
                # block as its headers, the recipients' blocks as its body.
                body = block.get_payload() if not block.is_multipart() else None
                if isinstance(body, str) and body.strip():
                    yield from _split_blocks(body)
        return
    # Encoded (base64 or quoted-printable) delivery-status: decode and split by hand.
    decoded = part.get_payload(decode=True)
    if isinstance(decoded, bytes):
        yield from _split_blocks(decoded.decode("utf-8", errors="replace"))


def _split_blocks(text: str) -> Iterator[Message]:
    parser = HeaderParser(policy=policy.compat32)
    for chunk in re.split(r"\r?\n[ \t]*\r?\n", text):
        if chunk.strip():
            yield parser.parsestr(chunk.strip() + "\n")


# ---- heuristics (flufl.bounce)

_SYSTEM_SENDER = re.compile(r"^(mailer-daemon|postmaster|mail-daemon|mdaemon)@", re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(
    r"^\s*(undeliver|undelivered mail|mail delivery (failed|failure)|delivery (status notification|failure)"
    r"|returned mail|failure notice|non[- ]?delivery|nondeliverable|delivery has failed)",
    re.IGNORECASE,
)


def _is_system_notice(msg: Message) -> bool:
    if msg.get("X-Failed-Recipients"):
        return True
    senders = [addr for _, addr in getaddresses([str(v) for v in msg.get_all("From", [])])]
    if any(_SYSTEM_SENDER.match(addr) for addr in senders):
        return True
    return bool(_BOUNCE_SUBJECT.match(_subject(msg)))


def _from_heuristics(msg: Message, *, had_report: bool) -> BounceFacts:
    try:
        temporary, permanent = all_failures(msg)
    except Exception as exc:  # noqa: BLE001 - its heuristics on garbage: unreadable, not a crash
        return BounceFacts(BounceKind.UNREADABLE, reason=f"flufl.bounce failed: {type(exc).__name__}")
    found = sorted(permanent) or sorted(temporary)
    if not found:
        reason = (
            "a delivery report with no readable recipient block"
            if had_report
            else ("a mail system notice with no failure we could read")
        )
        return BounceFacts(BounceKind.UNREADABLE, reason=reason)
    kind = BounceKind.HARD if permanent else BounceKind.DELAYED
    return BounceFacts(
        kind,
        recipient=_address(found[0].decode("ascii", errors="replace")),
        reported_at=_date(msg.get("Date")),
        action="failed" if permanent else "delayed",
    )


# ---- auto-replies (RFC 3834 and the habits of mail clients)

_OUT_OF_OFFICE = re.compile(
    r"^\s*(?:(?:re|aw|sv|fw|wg)\s*:\s*)?(?:"
    r"out of (?:the )?office|automatic reply|auto[- ]?reply|autoreply|auto[- ]?response|away from"
    r"|abwesenheitsnotiz|automatische antwort|abwesend"
    r"|r[ée]ponse automatique|absence|absent"
    r"|respuesta autom[áa]tica|fuera de la oficina"
    r"|risposta automatica|fuori sede"
    r"|automatisch antwoord|afwezig"
    r"|автоматический ответ|автоответ|нет на месте"
    r")",
    re.IGNORECASE,
)


def _is_auto_reply(msg: Message) -> bool:
    submitted = _flat(msg.get("Auto-Submitted")).lower()
    if submitted and _first_word(submitted) != "no":
        return True
    if msg.get("X-Autoreply") or msg.get("X-Autorespond"):
        return True
    if _flat(msg.get("Precedence")).lower() == "auto_reply":
        return True
    return bool(_OUT_OF_OFFICE.match(_subject(msg)))


# ---- the ways back to the letter

#: where the address a message was delivered to shows (Postfix, Postfix, Exim; then To)
_CANDIDATE_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "To")
_ORIGINAL_TYPES = ("message/rfc822", "message/global", "text/rfc822-headers", "message/global-headers")


def _header_candidates(msg: Message) -> list[str]:
    found: list[str] = []
    for name in _CANDIDATE_HEADERS:
        values = [str(v) for v in msg.get_all(name, [])]
        found += [addr for _, addr in getaddresses(values) if "@" in addr]
    return found


def _original_headers(msg: Message) -> Message | None:
    for part in msg.walk():
        kind = part.get_content_type()
        if kind not in _ORIGINAL_TYPES:
            continue
        if kind.startswith("message/") and part.is_multipart():
            inner = part.get_payload(0)
            return inner if isinstance(inner, Message) else None
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            return BytesHeaderParser(policy=policy.compat32).parsebytes(data)
    return None


def _original_return_path(msg: Message) -> list[str]:
    original = _original_headers(msg)
    if original is None:
        return []
    return [addr for _, addr in getaddresses([_flat(original.get("Return-Path"))]) if "@" in addr]


def _original_message_id(msg: Message) -> str | None:
    original = _original_headers(msg)
    if original is None:
        return None
    match = re.search(r"<[^<>\s@]+@[^<>\s@]+>", _flat(original.get("Message-ID")))
    return match.group(0) if match and len(match.group(0)) <= 250 else None


# ---- small readers

# Starts only where a run of address characters starts, and never gives back what it took:
# linear on a long run without an "@" (the plain form is quadratic there).
_ADDRESS = re.compile(r"(?<![^\s<>\"'();,:@])[^\s<>\"'();,:@]++@[A-Za-z0-9.-]++")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


#: a header value is read only this far (the facts are short; the regexes stay cheap)
_HEADER_CHARS = 2000


def _flat(value: Any) -> str:
    """A header value as one line of text (folding and control characters gone), cut short."""
    if value is None:
        return ""
    return re.sub(r"\s+", " ", _CONTROL.sub(" ", str(value)[:_HEADER_CHARS])).strip()


def _subject(msg: Message) -> str:
    """The Subject as text: RFC 2047 encoded words decoded, raw 8-bit read as UTF-8."""
    value = msg.get("Subject")
    if value is None:
        return ""
    try:
        parts = decode_header(value if isinstance(value, Header) else str(value)[:_HEADER_CHARS])
    except (LookupError, UnicodeError, ValueError, HeaderParseError):
        return _flat(value)
    text = "".join(
        part.decode(_charset(charset), errors="replace") if isinstance(part, bytes) else part for part, charset in parts
    )
    return _flat(text)


def _charset(name: str | None) -> str:
    try:
        return codecs.lookup(name).name if name and name != "unknown-8bit" else "utf-8"
    except LookupError:
        return "utf-8"


def _first_word(value: str | None) -> str | None:
    return value.split()[0].strip(";").lower() if value and value.split() else None


def _typed(value: str | None) -> str | None:
    """The value of a typed field without its type: ``dns; mx.example`` → ``mx.example``."""
    if not value:
        return None
    _, semicolon, rest = value.partition(";")
    return (rest if semicolon else value).strip().strip("<>").strip() or None


def _host(value: str | None) -> str | None:
    # "dns; gmail-smtp-in.l.google.com. (2a00:..., the server for the domain x.example.)"
    words = (_typed(value) or "").split()
    return _short(words[0].rstrip("."), 255) if words else None


def _address(value: str | None) -> str | None:
    if not value:
        return None
    match = _ADDRESS.search(value)
    return match.group(0)[:254] if match else None


def _diagnostic(value: str | None, recipient: str | None) -> str | None:
    """The far side's words, without addresses other than the official's (a diagnostic may
    quote the letter's From or Reply-To), trimmed."""
    text = _typed(value) if value and re.match(r"^[A-Za-z-]+\s*;", value) else value
    if not text:
        return None
    keep = (recipient or "").lower()
    text = _ADDRESS.sub(lambda m: m.group(0) if m.group(0).lower() == keep else "[address]", text)
    return _short(text, DIAGNOSTIC_CHARS)


def _short(value: str | None, limit: int) -> str | None:
    if not value:
        return None
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _date(value: Any) -> datetime | None:
    text = _flat(value)
    if not text:
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _dedupe(addresses: list[str]) -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for address in addresses:
        seen.setdefault(address.lower(), address)
    return tuple(seen.values())


def _unreadable(reason: str, truncated: bool, envelope: tuple[str, ...], size: int) -> BounceFacts:
    log.warning("bounce.unreadable", reason=reason, size=size, truncated=truncated)
    return BounceFacts(BounceKind.UNREADABLE, reason=reason, truncated=truncated, verp_candidates=envelope)


__all__ = [
    "DIAGNOSTIC_CHARS",
    "MAX_BYTES",
    "BounceFacts",
    "BounceKind",
    "classify_reply",
    "classify_status",
    "read_bounce",
    "reply_status",
    "suppresses_address",
]
