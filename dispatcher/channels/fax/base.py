"""The fax gateway interface: one small protocol, one adapter module per gateway.

Adapters turn their provider's API into :class:`FaxReport` values and their failure reasons
into the error classes of DESIGN.md (see :func:`failure_error`). No gateway offers an
idempotency key for sending, so every adapter must, after an uncertain create (timeout, 5xx,
lost response), look the fax up by our tag before it sends again: a fax is never sent twice
because a response was lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol, runtime_checkable

from dispatcher.errors import (
    DeliveryError,
    DocumentRejected,
    OperationalError,
    PermanentError,
    SuspectRecipient,
    TransientError,
)


class FaxStatus(StrEnum):
    QUEUED = "queued"  # accepted by the gateway, not yet dialled
    SENDING = "sending"  # a call is in progress
    DELIVERED = "delivered"  # the receiving machine confirmed every page
    FAILED = "failed"


#: how far along a fax is; a status report never moves a fax backwards on this scale
STATUS_RANK = {FaxStatus.QUEUED: 0, FaxStatus.SENDING: 1, FaxStatus.DELIVERED: 2, FaxStatus.FAILED: 2}


class FailureKind(StrEnum):
    """Why a fax failed, in our words; each gateway maps its own reasons onto these."""

    BUSY = "busy"
    NO_ANSWER = "no_answer"  # rang out
    CONGESTION = "congestion"  # network could not place the call
    NO_FAX_TONE = "no_fax_tone"  # answered, but no fax machine (T.30 initial-communication timeout)
    INTERRUPTED = "interrupted"  # call dropped or receiver hung up mid-document
    INVALID_NUMBER = "invalid_number"  # unallocated, invalid or barred number
    DOCUMENT_REJECTED = "document_rejected"  # our file was refused: our bug
    AUTHENTICATION = "authentication"  # bad credentials
    FUNDS = "funds"  # account out of funds / suspended
    GATEWAY_ERROR = "gateway_error"  # the gateway's own fault (5xx), try again
    UNKNOWN = "unknown"


class NoFaxToneError(SuspectRecipient):
    """Answered by something that is not a fax machine."""


#: transient kinds worth retrying on the normal backoff
_TRANSIENT = {FailureKind.BUSY, FailureKind.NO_ANSWER, FailureKind.CONGESTION, FailureKind.INTERRUPTED}
_TRANSIENT |= {FailureKind.GATEWAY_ERROR, FailureKind.UNKNOWN}


@dataclass(frozen=True)
class FaxFailure:
    kind: FailureKind
    #: the gateway's own reason code or T.30 result, kept verbatim for operators
    code: str | None = None
    text: str = ""

    def error(self) -> DeliveryError:
        return failure_error(self)


def failure_error(failure: FaxFailure) -> DeliveryError:
    """The DESIGN.md class of a fax failure."""
    message = f"{failure.kind.value}: {failure.text}" if failure.text else failure.kind.value
    if failure.kind in _TRANSIENT:
        return TransientError(message, code=failure.code)
    if failure.kind is FailureKind.NO_FAX_TONE:
        return NoFaxToneError(message, code=failure.code)
    if failure.kind is FailureKind.DOCUMENT_REJECTED:
        return DocumentRejected(message, code=failure.code)
    if failure.kind is FailureKind.INVALID_NUMBER:
        return PermanentError(message, code=failure.code)
    return OperationalError(message, code=failure.code)


@dataclass(frozen=True)
class FaxJob:
    """One letter to fax. ``tag`` is our delivery id: it travels as the gateway's client_state
    or label so that a fax can be found again after a lost response."""

    tag: str
    to_number: str  # E.164
    pdf: bytes
    #: fax-ready TIFF (1728 px wide, G4), for gateways and the lab that take TIFF
    tiff: bytes
    pages: int
    from_number: str | None = None  # E.164 caller id, when the section has one
    #: shown to gateways that print a header line ("TSI"); ASCII, at most 20 characters
    station_id: str | None = None


@dataclass(frozen=True)
class FaxReport:
    """What a gateway says about one fax: from a create call, a lookup or a webhook."""

    gateway: str
    remote_id: str
    status: FaxStatus
    tag: str | None = None
    pages: int | None = None
    #: seconds of line time
    duration_s: float | None = None
    failure: FaxFailure | None = None
    occurred_at: datetime | None = None
    #: the gateway's own status word, verbatim
    raw_status: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.status in (FaxStatus.DELIVERED, FaxStatus.FAILED)


@runtime_checkable
class FaxGateway(Protocol):
    name: str

    async def send(self, job: FaxJob) -> FaxReport:
        """Create the fax. Raises a classified DeliveryError when it certainly was not created;
        after an uncertain failure it looks the fax up by ``job.tag`` before trying again."""
        ...

    async def find_by_tag(self, tag: str) -> FaxReport | None:
        """The fax created for ``tag``, if any (the newest one)."""
        ...

    async def get(self, remote_id: str) -> FaxReport: ...

    async def aclose(self) -> None: ...


def newest(reports: Sequence[FaxReport]) -> FaxReport | None:
    """The most advanced report of several (webhooks arrive out of order)."""
    if not reports:
        return None
    return max(reports, key=lambda r: (STATUS_RANK[r.status], r.occurred_at.timestamp() if r.occurred_at else 0.0))
