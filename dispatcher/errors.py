"""One error hierarchy for the whole service.

Three families hang off :class:`DispatchError`:

* :class:`ConfigError` — the configuration cannot be used; always names file and key.
* :class:`IntakeError` — an appeal is refused; carries the HTTP status and a machine code so
  the API and the in-process Python intake refuse identically.
* :class:`DeliveryError` — a send did not succeed; carries the outcome class from DESIGN.md
  and, like aiosmtplib's ``SMTPResponseException``, the remote code and text, so the ledger
  and the log record what the other side actually said.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class DispatchError(Exception):
    """Base of every error this package raises on purpose."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message}"


class ConfigError(DispatchError):
    """One or more problems in the configuration, each naming its file and key."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --------------------------------------------------------------------------- intake


@dataclass(frozen=True)
class FieldProblem:
    """One field's problem. ``code`` is stable and machine-readable (a form translates it into its
    own language); ``message`` is English for the developer. docs/intake.md lists the codes."""

    loc: tuple[str | int, ...]
    message: str
    code: str = "invalid"

    def as_dict(self) -> dict[str, Any]:
        return {"field": ".".join(str(p) for p in self.loc), "code": self.code, "message": self.message}


class IntakeError(DispatchError):
    """An appeal refused at intake. ``status`` is what the HTTP API answers."""

    status: int = 422
    code: str = "invalid_appeal"

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}

    def headers(self) -> dict[str, str]:
        """HTTP headers the API sends with this refusal."""
        return {}


class AuthenticationFailed(IntakeError):
    status = 401
    code = "invalid_signature"


class SignatureReplayed(AuthenticationFailed):
    code = "replayed_signature"


class SignatureExpired(AuthenticationFailed):
    code = "stale_signature"


class ValidationFailed(IntakeError):
    status = 422
    code = "invalid_appeal"

    def __init__(self, problems: list[FieldProblem], message: str | None = None):
        self.problems = problems
        msg = message or "; ".join(f"{'.'.join(map(str, p.loc))}: {p.message}" for p in problems)
        super().__init__(msg, fields=[p.as_dict() for p in problems])


class InvalidWebhook(ValidationFailed):
    """A gateway's webhook that authenticated but cannot be read as a report."""

    code = "invalid_webhook"


class BodyTooLarge(IntakeError):
    status = 413
    code = "body_too_large"


class DuplicateAppeal(IntakeError):
    status = 409
    code = "duplicate_appeal"

    def __init__(self, appeal_id: str, message: str | None = None):
        super().__init__(
            message or "this supporter has already signed this campaign through this section",
            appeal_id=appeal_id,
        )
        self.appeal_id = appeal_id


class CampaignClosed(IntakeError):
    status = 410
    code = "campaign_closed"


class QuotaExceeded(IntakeError):
    """Too many appeals through one section key, by one supporter or from one client IP: try
    again after ``retry_after`` seconds (also sent as the ``Retry-After`` header)."""

    status = 429
    code = "quota_exceeded"

    def __init__(self, message: str, *, quota: str, limits: Sequence[str], retry_after: int):
        super().__init__(message, quota=quota, limits=list(limits), retry_after=retry_after)
        self.quota = quota
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class NotFound(IntakeError):
    status = 404
    code = "not_found"


# --------------------------------------------------------------------------- delivery


class Outcome(StrEnum):
    """The outcome classes of DESIGN.md, plus success."""

    SENT = "sent"
    TRANSIENT = "transient"
    DEFERRED = "deferred"
    PERMANENT = "permanent"
    OPERATIONAL = "operational"


class DeliveryError(DispatchError):
    """A send that did not succeed, with what the remote side said."""

    outcome: Outcome = Outcome.TRANSIENT

    def __init__(self, message: str, *, code: int | str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        #: seconds the remote side asked us to wait (HTTP Retry-After, greylisting hints)
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code} {self.message}" if self.code is not None else self.message


class TransientError(DeliveryError):
    """Try again later: 4xx, busy line, connection reset."""

    outcome = Outcome.TRANSIENT


class BlipError(TransientError):
    """A transient error worth retrying within seconds, in-process (connection reset, timeout)."""


class DeferredError(DeliveryError):
    """Not now, by our own policy (budget used up, outside office hours); not a failure.

    ``reason`` is a short fixed word saying which policy held the letter back (``office_hours``,
    ``recipient_cap``, ``paused``, ...): the label of the deferral metrics, never free text."""

    outcome = Outcome.DEFERRED

    def __init__(
        self,
        message: str,
        *,
        code: int | str | None = None,
        retry_after: float | None = None,
        reason: str = "other",
    ):
        super().__init__(message, code=code, retry_after=retry_after)
        self.reason = reason


class PermanentError(DeliveryError):
    """Will never succeed as it is: unknown address, invalid number, document rejected."""

    outcome = Outcome.PERMANENT


class OperationalError(DeliveryError):
    """Our side is broken (credentials, funds, relay refuses us): pause, alert, fail nothing."""

    outcome = Outcome.OPERATIONAL


class Bounced(PermanentError):
    """The far end refused the letter for good: a 5xx at RCPT or DATA, or a bounce that came
    back later. The letter ends ``bounced``; ``suppress`` says whether the refusal is about the
    address (unknown user, no such domain: nobody should write to it again by this channel) or
    about this letter or its sender (rejected as spam, DMARC), which suppresses nothing."""

    def __init__(self, message: str, *, code: int | str | None = None, suppress: bool = False):
        super().__init__(message, code=code)
        self.suppress = suppress


class HeaderInjection(PermanentError):
    """Supporter input that would have become a header holds control characters or '=?'."""


class SuspectRecipient(TransientError):
    """The recipient's address answered, but not as its channel expects (a fax number answered
    by a voice line). Retried a few times at long intervals; after that the address is flagged
    for an operator rather than failed silently."""


class DocumentRejected(PermanentError):
    """Our document was refused by the far side (its format, its size): a bug on our side, never
    just a letter's bad luck, so operators are alerted."""


class UnknownChannel(DispatchError, LookupError):
    """A channel name no registered channel answers to."""

    def __init__(self, name: str, known: Sequence[str]):
        self.name = name
        super().__init__(f"no channel {name!r} (registered: {', '.join(sorted(known)) or 'none'})")


class MailboxError(OperationalError):
    """The bounce mailbox cannot be read: server unreachable, TLS failed, login refused, folder
    missing. Names host, port and user; never the password."""

    def __init__(self, message: str, *, host: str, port: int, username: str):
        super().__init__(f"{message} (IMAP {username}@{host}:{port})")
        self.host = host
        self.port = port
        self.username = username


class MailboxLoginRefused(MailboxError):
    """The IMAP server refused our user name and password: fix the credentials."""


class MailboxFolderMissing(MailboxError):
    """We are logged in, but the folder cannot be opened: fix the folder's name."""


# --------------------------------------------------------------------------- operators


class OperatorError(DispatchError):
    """An operator account cannot be created or changed as asked (a name taken or unknown, a role
    or section that does not exist, a password too short). The message says which."""


class ConsoleError(DispatchError):
    """A console request refused; ``status`` is what the console answers, ``title`` heads the
    page that explains it (docs/console.md)."""

    status: int = 400
    title: str = "Not possible"

    def __init__(self, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class OutOfScope(ConsoleError):
    """Something that does not exist for this operator: another section's letter answers exactly
    like a letter that does not exist, so ids of other sections do not leak."""

    status = 404
    title = "Not found"


class NotAllowed(ConsoleError):
    """The operator sees this but may not do this (a viewer acting, an operator doing an admin's
    work)."""

    status = 403
    title = "Not allowed"


class CsrfRefused(ConsoleError):
    """A form posted without the session's token, or with another one."""

    status = 403
    title = "Form refused"


class TooManyLogins(ConsoleError):
    status = 429
    title = "Too many sign-in attempts"
