"""What comes back to a letter's bounce address, read as the facts: each MTA's bounce format,
soft bounces and warnings, auto-replies, and bad input that must be dropped without a crash.

The fixtures under tests/fixtures/bounces/ follow each MTA's published format (Postfix's
bounce(5) templates, Exim's "mail delivery software" message, Microsoft 365's NDR, Gmail's
"Address not found", qmail's QSBMF); ``{{VERP}}`` in them is replaced by a real token made
with the test key for LETTER.
"""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dispatcher.channels.email import bounces
from dispatcher.channels.email.bounces import (
    DIAGNOSTIC_CHARS,
    BounceKind,
    classify_reply,
    classify_status,
    read_bounce,
    reply_status,
    suppresses_address,
)
from dispatcher.channels.email.verp import Verp

FIXTURES = Path(__file__).parent / "fixtures" / "bounces"
KEY = b"test-key-for-verp-tokens-32bytes"
DOMAIN = "bounces.ch.dispatch.example"
LETTER = "dl_0123456789abcdef0123456789abcdef"
VERP = Verp(KEY, domains=[DOMAIN])
#: what the fixtures hold of the supporter: none of it may reach the facts
SUPPORTER = ("maria", "muster", "supporter.example", "Teststrasse", "Zurich", "release Ana")


def load(name: str) -> bytes:
    token = VERP.address(LETTER, domain=DOMAIN).partition("+")[2].partition("@")[0]
    return (FIXTURES / name).read_bytes().replace(b"{{VERP}}", token.encode())


def letter_of(facts: bounces.BounceFacts) -> str | None:
    found = {VERP.read(a) for a in facts.verp_candidates} - {None}
    assert len(found) <= 1
    return found.pop() if found else None


# fixture, kind, status, failed recipient, reporting MTA, remote MTA, suppresses, original Message-ID
CASES = [
    (
        "postfix_hard.eml",
        "hard",
        "5.1.1",
        "minister@ministry.example",
        "mail.ch.dispatch.example",
        "mx.ministry.example",
        True,
        "<dl.0123456789abcdef@ch.dispatch.example>",
    ),
    # Exim writes Status: 5.0.0 and the real code only in the diagnostic
    (
        "exim_hard.eml",
        "hard",
        "5.1.1",
        "secretary@ministry.example",
        "relay.ch.dispatch.example",
        "mx1.ministry.example",
        True,
        "<dl.exim0123456789@ch.dispatch.example>",
    ),
    (
        "exchange_hard.eml",
        "hard",
        "5.1.10",
        "cabinet@ministry.example",
        "AM0PR01MB1234.eurprd01.prod.exchangelabs.com",
        None,
        True,
        "<dl.exchange0123@ch.dispatch.example>",
    ),
    (
        "gmail_hard.eml",
        "hard",
        "5.1.1",
        "ombudsman@ombuds.example",
        "googlemail.com",
        "gmail-smtp-in.l.google.com",
        True,
        "<dl.gmail0123@ch.dispatch.example>",
    ),
    # no delivery-status part: flufl.bounce finds the failed address, there is no status
    ("exim_old_plain.eml", "hard", None, "secretary@ministry.example", None, None, False, None),
    ("qmail_plain.eml", "hard", None, "governor@ministry.example", None, None, False, None),
    # mailbox full: soft, whether the relay said 5.2.2 or gave up on 4.2.2
    (
        "mailbox_full_522.eml",
        "soft",
        "5.2.2",
        "minister@ministry.example",
        "mail.ch.dispatch.example",
        "mx.ministry.example",
        False,
        "<dl.0123456789abcdef@ch.dispatch.example>",
    ),
    (
        "mailbox_full_422.eml",
        "soft",
        "4.2.2",
        "minister@ministry.example",
        "mail.ch.dispatch.example",
        "mx.ministry.example",
        False,
        "<dl.0123456789abcdef@ch.dispatch.example>",
    ),
    (
        "delayed.eml",
        "delayed",
        "4.4.1",
        "minister@ministry.example",
        "mail.ch.dispatch.example",
        None,
        False,
        "<dl.0123456789abcdef@ch.dispatch.example>",
    ),
    # rejected as spam: this letter failed, but the office's address is fine
    (
        "policy_rejected.eml",
        "hard",
        "5.7.1",
        "press@ministry.example",
        "mail.ch.dispatch.example",
        "mx.ministry.example",
        False,
        None,
    ),
    ("auto_reply.eml", "auto_reply", None, None, None, None, False, None),
    ("out_of_office_subject.eml", "auto_reply", None, None, None, None, False, None),
]


@pytest.mark.parametrize(
    ("name", "kind", "status", "recipient", "reporting", "remote", "suppresses", "message_id"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_each_format_is_classified_and_names_its_letter(
    name, kind, status, recipient, reporting, remote, suppresses, message_id
):
    facts = read_bounce(load(name))
    assert facts.kind == kind
    assert facts.status == status
    assert facts.recipient == recipient
    assert facts.reporting_mta == reporting
    assert facts.remote_mta == remote
    assert facts.suppresses_address is suppresses
    assert facts.original_message_id == message_id
    assert letter_of(facts) == LETTER
    assert not facts.truncated


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.eml")))
def test_nothing_of_the_supporter_is_kept(name):
    facts = read_bounce(load(name))
    kept = repr(facts).lower() + repr(facts.log_fields()).lower()
    assert [word for word in SUPPORTER if word.lower() in kept] == []


def test_the_facts_of_a_dsn_are_all_there():
    facts = read_bounce(load("postfix_hard.eml"))
    assert facts.action == "failed"
    assert facts.diagnostic == (
        "550 5.1.1 <minister@ministry.example>: Recipient address rejected: User unknown in virtual mailbox table"
    )
    assert facts.reported_at == datetime(2024, 3, 12, 8, 15, 2, tzinfo=UTC)
    assert facts.is_bounce
    assert facts.log_fields()["kind"] == "hard"


def test_the_last_attempt_is_when_it_failed():
    facts = read_bounce(load("mailbox_full_422.eml"))
    assert facts.reported_at == datetime(2024, 3, 17, 8, 14, 58, tzinfo=UTC)


def test_a_diagnostic_keeps_the_officials_address_and_no_other():
    facts = read_bounce(load("policy_rejected.eml"))
    assert facts.diagnostic is not None
    assert "press@ministry.example" in facts.diagnostic
    assert "[address]" in facts.diagnostic


def test_a_long_diagnostic_is_trimmed():
    raw = load("postfix_hard.eml").replace(b"in virtual mailbox table", b"x" * 5000)
    facts = read_bounce(raw)
    assert facts.kind == "hard"
    assert facts.diagnostic is not None and len(facts.diagnostic) == DIAGNOSTIC_CHARS


def test_the_envelope_recipient_is_the_candidate_when_the_listener_knows_it():
    envelope = VERP.address(LETTER, domain=DOMAIN).upper()
    facts = read_bounce(load("no_token.eml"), envelope_recipients=[envelope])
    assert facts.verp_candidates == (envelope,)
    assert letter_of(facts) == LETTER


def test_a_dsn_without_a_token_is_read_but_names_no_letter():
    facts = read_bounce(load("no_token.eml"))
    assert facts.kind == "hard"
    assert facts.verp_candidates
    assert {VERP.check(a).refused for a in facts.verp_candidates} == {"not_ours"}
    # the returned original's Message-ID is the other way back to the letter
    assert facts.original_message_id == "<dl.0123456789abcdef@ch.dispatch.example>"


def test_a_forged_token_names_no_letter():
    facts = read_bounce(load("forged_token.eml"))
    assert facts.kind == "hard"
    assert {VERP.check(a).refused for a in facts.verp_candidates} == {"forged"}


@pytest.mark.parametrize("name", ["malformed_boundary.eml", "malformed_status.eml"])
def test_a_malformed_bounce_is_unreadable_and_logged(name):
    with capture_logs() as logs:
        facts = read_bounce(load(name))
    assert facts.kind == "unreadable"
    assert facts.reason
    assert [e["event"] for e in logs] == ["bounce.unreadable"]
    assert letter_of(facts) == LETTER  # the listener can still count it against its letter


def huge_bounce(size: int) -> bytes:
    """A Postfix DSN that returned the whole original, with a ``size`` byte attachment."""
    head, _, _ = load("postfix_hard.eml").rpartition(b"--4TqZ1c2XyZz9sBc")
    attachment = base64.encodebytes(random.Random(7).randbytes(size * 3 // 4))
    original = (
        b"--4TqZ1c2XyZz9sBc.1710231302/mail.ch.dispatch.example\n"
        b"Content-Type: message/rfc822\n\n"
        b"From: Amnesty Section CH <appeals@ch.dispatch.example>\n"
        b"Message-ID: <dl.big@ch.dispatch.example>\n"
        b'Content-Type: multipart/mixed; boundary="inner"\n\n'
        b"--inner\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
        + attachment
        + b"\n--inner--\n\n--4TqZ1c2XyZz9sBc.1710231302/mail.ch.dispatch.example--\n"
    )
    return head.replace(b"Content-Type: text/rfc822-headers", b"Content-Type: text/plain") + original


def test_a_10_mb_bounce_is_read_from_its_head(monkeypatch):
    raw = huge_bounce(10 * 1024 * 1024)
    assert len(raw) > 10 * 1024 * 1024
    parsed: list[int] = []
    parse = bounces.BytesParser.parsebytes
    monkeypatch.setattr(
        bounces.BytesParser, "parsebytes", lambda self, data: parsed.append(len(data)) or parse(self, data)
    )

    facts = read_bounce(raw)

    assert facts.kind == "hard"
    assert facts.status == "5.1.1"
    assert facts.truncated
    assert facts.original_message_id == "<dl.big@ch.dispatch.example>"
    assert letter_of(facts) == LETTER
    assert parsed and max(parsed) <= bounces.MAX_BYTES


def test_a_head_the_caller_cut_itself_is_read_and_marked():
    head = huge_bounce(3 * 1024 * 1024)[: 64 * 1024]
    facts = read_bounce(head, cut=True)
    assert facts.kind == "hard"
    assert facts.truncated


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00" * 1000,
        b"\xff\xfe" * 5000,
        b"just some words, not mail at all",
        b"Content-Type: multipart/report; boundary=\n\n--\n--\n",
        b"Content-Type: message/delivery-status\n\nAction: failed\nStatus: 9.9.9.9.9\n",
        b"Subject: =?utf-8?q?=ff=fe?=\nFrom: <<<@@@>>>\nDate: 99 Foo 99999 99:99:99\n\nhi",
        random.Random(3).randbytes(200_000),
    ],
    ids=["empty", "nul", "binary", "text", "empty-boundary", "bad-status", "bad-headers", "random"],
)
def test_garbage_never_raises(raw):
    facts = read_bounce(raw)
    assert facts.kind in ("unreadable", "not_a_bounce")


@pytest.mark.parametrize(
    "raw",
    [
        b"From: MAILER-DAEMON@x.example\nContent-Type: multipart/report; " + b"a=b; " * 200_000 + b"\n\nbody\n",
        b'From: MAILER-DAEMON@x.example\nContent-Type: multipart/mixed; boundary="B"\n\n' + b"--B\n\n" * 150_000,
        b"From: MAILER-DAEMON@x.example\n" + b"Content-Type: message/rfc822\n\n" * 20_000 + b"x\n",
        b"From: MAILER-DAEMON@x.example\nSubject: failure notice\n\n" + b"<a@b.example>:\n" * 60_000,
    ],
    ids=["40000-parameters", "150000-parts", "20000-nested", "60000-addresses"],
)
def test_crafted_structures_are_dropped(raw):
    """Shapes that make the email package or the detectors work hard (the first two took 11 s
    and 27 s at 1 MiB before the head was capped and parts counted) end unreadable."""
    assert read_bounce(raw).kind == "unreadable"


def message(subject: str, **headers: str) -> bytes:
    lines = [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    text = "\n".join(
        [
            "From: office@ministry.example",
            f"To: {VERP.address(LETTER, domain=DOMAIN)}",
            f"Subject: {subject}",
            *lines,
            "",
            "Body.",
        ]
    )
    return text.encode()


@pytest.mark.parametrize(
    "subject",
    [
        "Out of Office: Release Ana Example now",
        "Automatic reply: Release Ana Example now",
        "Abwesenheitsnotiz: Release Ana Example now",
        "Réponse automatique : Release Ana Example now",
        "Absence : Release Ana Example now",
        "Respuesta automática: Release Ana Example now",
        "Автоматический ответ: Release Ana Example now",
        "Risposta automatica: Release Ana Example now",
        "=?utf-8?b?0JDQstGC0L7QvNCw0YLQuNGH0LXRgdC60LjQuSDQvtGC0LLQtdGC?= Release Ana",
    ],
)
def test_an_out_of_office_subject_is_an_auto_reply(subject):
    facts = read_bounce(message(subject))
    assert facts.kind == "auto_reply"
    assert not facts.is_bounce
    assert letter_of(facts) == LETTER


@pytest.mark.parametrize(
    "headers",
    [
        {"Auto_Submitted": "auto-replied"},
        {"Auto_Submitted": "auto-generated"},
        {"X_Autoreply": "yes"},
        {"X_Autorespond": "Your message was received"},
        {"Precedence": "auto_reply"},
    ],
)
def test_auto_reply_headers_make_an_auto_reply(headers):
    assert read_bounce(message("Re: Release Ana Example now", **headers)).kind == "auto_reply"


def test_an_officials_own_answer_is_not_a_bounce():
    facts = read_bounce(message("Re: Release Ana Example now", Auto_Submitted="no"))
    assert facts.kind == "not_a_bounce"
    assert not facts.is_bounce


def test_a_positive_delivery_report_is_not_a_bounce():
    raw = (
        load("postfix_hard.eml")
        .replace(b"Action: failed", b"Action: delivered")
        .replace(b"Status: 5.1.1", b"Status: 2.0.0")
    )
    assert read_bounce(raw).kind == "not_a_bounce"


@pytest.mark.parametrize(
    ("code", "text", "kind", "suppress"),
    [
        (550, "5.1.1 <x@ministry.example>: Recipient address rejected: User unknown", "hard", True),
        (550, "5.1.10 RESOLVER.ADR.RecipientNotFound", "hard", True),
        (554, "5.1.2 Host or domain name not found", "hard", True),
        (550, "5.7.1 Message rejected as spam", "hard", False),
        (550, "5.7.26 Unauthenticated email is not accepted due to DMARC", "hard", False),
        (553, "5.1.8 Sender address rejected: Domain not found", "hard", False),
        (552, "5.2.2 Mailbox full", "soft", False),
        (552, "Requested mail action aborted: exceeded storage allocation", "soft", False),
        (552, "5.3.4 Message too big", "hard", False),
        (452, "4.2.2 Mailbox full", "soft", False),
        (450, "4.7.1 Greylisted, try again in 300 seconds", "soft", False),
        (550, "No such user", "hard", False),
        (550, "4.2.2 a status that disagrees with the code", "hard", False),
    ],
)
def test_a_synchronous_refusal_is_classified_by_the_same_rules(code, text, kind, suppress):
    assert classify_reply(code, text) == kind
    assert suppresses_address(reply_status(text)) is suppress


def test_only_refusals_and_statuses_are_classified():
    with pytest.raises(ValueError):
        classify_reply(250, "2.0.0 Ok")
    with pytest.raises(ValueError):
        classify_status("mailbox full")
    assert classify_status("5.2.2") == BounceKind.SOFT
    assert suppresses_address(None) is False
    assert suppresses_address("4.1.1") is False
