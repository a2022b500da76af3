"""Classification on constructed exceptions; test_email_pool.py does it through a real server."""

from __future__ import annotations

import socket
import ssl

import aiosmtplib
import pytest

from dispatcher.channels.email.classify import classify, retry_after_hint
from dispatcher.errors import (
    BlipError,
    Bounced,
    DeliveryError,
    OperationalError,
    PermanentError,
    TransientError,
)


def caused_by(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


CASES: list[tuple[str, BaseException, str | None, type[DeliveryError], int | None]] = [
    ("rcpt 550", aiosmtplib.SMTPRecipientRefused(550, "5.1.1 <x@y.org>: unknown user", "x@y.org"), None,
     Bounced, 550),
    ("all rcpts refused", aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(550, "5.1.1 no", "x")]),
     None, Bounced, 550),
    ("rcpt 552 mailbox full", aiosmtplib.SMTPRecipientRefused(552, "5.2.2 Mailbox full", "x"), None,
     TransientError, 552),
    ("rcpt 450 greylisted", aiosmtplib.SMTPRecipientRefused(450, "4.7.1 Greylisted", "x"), None, TransientError, 450),
    ("rcpt 421", aiosmtplib.SMTPRecipientRefused(421, "4.3.2 Shutting down", "x"), None, TransientError, 421),
    ("rcpt 452 full", aiosmtplib.SMTPRecipientRefused(452, "4.2.2 Mailbox full", "x"), None, TransientError, 452),
    ("rcpt 530", aiosmtplib.SMTPRecipientRefused(530, "5.7.0 Authentication required", "x"), None,
     OperationalError, 530),
    ("mail 550", aiosmtplib.SMTPSenderRefused(550, "5.7.1 Sender not allowed", "a@b.org"), None,
     OperationalError, 550),
    ("mail 553", aiosmtplib.SMTPSenderRefused(553, "5.1.8 Bad sender domain", "a@b.org"), None,
     OperationalError, 553),
    ("mail 451", aiosmtplib.SMTPSenderRefused(451, "4.3.0 Try later", "a@b.org"), None, TransientError, 451),
    ("mail 530", aiosmtplib.SMTPSenderRefused(530, "5.7.0 Authentication required", "a"), None,
     OperationalError, 530),
    ("data 554", aiosmtplib.SMTPDataError(554, "5.6.0 Content rejected"), None, Bounced, 554),
    ("data 552", aiosmtplib.SMTPDataError(552, "5.3.4 Message too big"), None, Bounced, 552),
    ("data 451", aiosmtplib.SMTPDataError(451, "4.3.0 Queue full"), None, TransientError, 451),
    ("generic 5xx at rcpt stage", aiosmtplib.SMTPResponseException(550, "5.1.1 no"), "rcpt", Bounced, 550),
    ("generic 5xx at mail stage", aiosmtplib.SMTPResponseException(550, "5.7.1 no"), "mail", OperationalError, 550),
    ("auth 535", aiosmtplib.SMTPAuthenticationError(535, "5.7.8 Authentication credentials invalid"), None,
     OperationalError, 535),
    ("auth 454", aiosmtplib.SMTPAuthenticationError(454, "4.7.0 Temporary auth failure"), None,
     OperationalError, 454),
    ("534 anywhere", aiosmtplib.SMTPResponseException(534, "5.7.9 Mechanism too weak"), "data", OperationalError, 534),
    ("538", aiosmtplib.SMTPResponseException(538, "5.7.11 Encryption required"), "connect", OperationalError, 538),
    ("greeting 554", aiosmtplib.SMTPConnectResponseError(554, "5.7.1 You are blocked"), "connect",
     OperationalError, 554),
    ("greeting 421", aiosmtplib.SMTPConnectResponseError(421, "4.7.0 Too many connections"), "connect",
     TransientError, 421),
    ("ehlo 550", aiosmtplib.SMTPHeloError(550, "5.7.1 Go away"), "connect", OperationalError, 550),
    ("malformed reply", aiosmtplib.SMTPResponseException(-1, "Malformed SMTP response line: x"), "data",
     TransientError, -1),
    ("disconnected", aiosmtplib.SMTPServerDisconnected("Connection lost"), "data", BlipError, None),
    ("refused", caused_by(aiosmtplib.SMTPConnectError("Error connecting"), ConnectionRefusedError(111, "refused")),
     "connect", BlipError, None),
    ("connect timeout", aiosmtplib.SMTPConnectTimeoutError("Timed out connecting"), "connect", BlipError, None),
    ("read timeout", aiosmtplib.SMTPReadTimeoutError("Timed out waiting"), "rcpt", BlipError, None),
    ("reset", ConnectionResetError(104, "Connection reset by peer"), "data", BlipError, None),
    ("dns hiccup", caused_by(aiosmtplib.SMTPConnectError("dns"), socket.gaierror(socket.EAI_AGAIN, "again")),
     "connect", BlipError, None),
    ("unknown relay host", caused_by(aiosmtplib.SMTPConnectError("dns"), socket.gaierror(socket.EAI_NONAME, "no")),
     "connect", OperationalError, None),
    ("bad certificate", caused_by(aiosmtplib.SMTPConnectError("tls"), ssl.SSLCertVerificationError(1, "verify")),
     "connect", OperationalError, None),
    ("starttls handshake", ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "connect",
     OperationalError, None),
    ("starttls not offered", aiosmtplib.SMTPException("SMTP STARTTLS extension not supported by server."),
     "connect", OperationalError, None),
    ("auth not offered", aiosmtplib.SMTPException("The SMTP AUTH extension is not supported by this server."),
     "connect", OperationalError, None),
    ("smtputf8 missing", aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server"), "mail",
     OperationalError, None),
]  # fmt: skip


@pytest.mark.parametrize(("exc", "stage", "expected", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classification(exc: BaseException, stage: str | None, expected: type[DeliveryError], code: int | None) -> None:
    error = classify(exc, stage)  # type: ignore[arg-type]
    assert type(error) is expected
    assert error.code == code


def test_code_and_text_are_kept_with_the_extended_status() -> None:
    error = classify(aiosmtplib.SMTPRecipientRefused(550, "5.1.1 <x@y.org>: Recipient address rejected", "x@y.org"))
    assert error.code == 550
    assert error.message == "5.1.1 <x@y.org>: Recipient address rejected"
    assert str(error) == "550 5.1.1 <x@y.org>: Recipient address rejected"


def test_blips_name_the_stage() -> None:
    error = classify(aiosmtplib.SMTPServerDisconnected("Connection lost"), "data")
    assert isinstance(error, BlipError)
    assert error.message == "Connection lost during DATA"


def test_the_most_serious_refusal_of_several_recipients_decides() -> None:
    refusals = [
        aiosmtplib.SMTPRecipientRefused(450, "4.7.1 Greylisted", "a@x.org"),
        aiosmtplib.SMTPRecipientRefused(550, "5.1.1 Unknown", "b@x.org"),
    ]
    assert isinstance(classify(aiosmtplib.SMTPRecipientsRefused(refusals)), PermanentError)


def test_delivery_errors_pass_through() -> None:
    original = PermanentError("already classified", code=550)
    assert classify(original) is original


def test_greylisting_hint_becomes_retry_after() -> None:
    error = classify(aiosmtplib.SMTPRecipientRefused(450, "4.7.1 Greylisted, please try again in 300 seconds", "x"))
    assert error.retry_after == 300.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("4.7.1 Greylisting in action, please come back in 00:05:00", 300.0),
        ("4.7.1 Try again in 2 minutes", 120.0),
        ("4.7.1 Greylisted, retry after 90s", 90.0),
        ("4.7.1 Greylisted, see https://postgrey.schweikert.ch/help/x.html", None),
        ("4.2.2 Mailbox full in 3 places", None),
    ],
)
def test_retry_after_hint(text: str, seconds: float | None) -> None:
    assert retry_after_hint(text) == seconds


@pytest.mark.parametrize(
    ("error", "suppressed"),
    [
        (aiosmtplib.SMTPRecipientRefused(550, "5.1.1 <x@y.org>: unknown user", "x@y.org"), True),
        (aiosmtplib.SMTPRecipientRefused(550, "Requested action not taken: mailbox unavailable", "x"), True),
        (aiosmtplib.SMTPRecipientRefused(550, "5.7.1 Rejected by DMARC policy", "x"), False),
        (aiosmtplib.SMTPDataError(550, "5.1.10 RecipientNotFound; not found by SMTP address lookup"), True),
        (aiosmtplib.SMTPDataError(554, "5.7.1 Message rejected as spam"), False),
        (aiosmtplib.SMTPDataError(554, "Transaction failed"), False),
    ],
)
def test_a_refusal_suppresses_the_address_only_when_it_is_about_the_address(
    error: BaseException, suppressed: bool
) -> None:
    result = classify(error)
    assert isinstance(result, Bounced)
    assert result.suppress is suppressed
