"""The small interface every delivery channel (email now, fax later) implements.

A channel's ``send`` signature is channel-specific for now (an email channel takes a built
``EmailMessage``, a fax gateway will take a document), so the Protocol only fixes what the
worker needs from all of them: a name for logs and metrics, and a way to release connections.
Failures are raised as :class:`dispatcher.errors.DeliveryError` subclasses, never returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SendResult:
    """What the remote side said when it accepted a letter."""

    #: the final reply code (SMTP 250, an HTTP status, a gateway's own code)
    code: int | str | None
    #: the final reply text as the remote side sent it
    text: str
    #: the remote side's id for the letter (SMTP queue id, gateway message id), if it gave one
    remote_id: str | None
    #: wall time of the whole send, including in-process retries of blips
    duration_ms: float


@runtime_checkable
class Channel(Protocol):
    name: str

    async def aclose(self) -> None: ...
