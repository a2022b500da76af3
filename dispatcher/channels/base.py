"""The channel protocol: what every way of delivering a letter tells the core.

A channel is to this service what a broker is to dramatiq: the worker, the sending gate, config
validation, the webhooks and the views ask the registry (:mod:`dispatcher.channels.registry`)
and never name one. Email and fax implement this protocol; a new channel (postal letters
through a print-and-mail API, say) is one folder and its tests — docs/adding-a-channel.md.

What a channel declares:

* **its facts** (class attributes, read by config validation and the ledger without building
  one): ``name``; ``document``, the kind of document the worker renders for it
  (:mod:`dispatcher.render.documents`); ``address_noun`` for config errors;
  ``sent_final_after``, when a ``sent`` letter is settled (at once, after a bounce window, or
  never: only by a later report); ``one_at_a_time``, one letter in flight per recipient;
  ``poll_after``, when to ask about a ``sent`` letter whose report has not come;
* **its config**: the model of a section's ``[channels.<name>]`` table (``config_model``;
  email and fax keep their historic ``[smtp]`` and ``[fax]``), where a target receives it
  (:meth:`Channel.address_of`), which environment variables a section's config names for it
  (:meth:`Channel.secrets`), what a section routing letters through it must have
  (:meth:`Channel.missing_settings`), the provider account a section's letters go through and that
  account's limits (:meth:`Channel.provider`), its default caps (from the service's settings)
  and whether office hours hold it;
* **its sending**: :meth:`Channel.prepare` (in the worker's thread) and :meth:`Channel.deliver`
  (on the event loop; or, for a channel that says ``blocking``, :meth:`Channel.deliver_blocking`
  in the worker's thread) take a rendered letter; ``deliver`` returns a
  :class:`Report`, or raises a classified :class:`dispatcher.errors.DeliveryError` (the error
  classes are the channel's mapping of its own failures onto the delivery classes);
* **its late outcomes**: :meth:`Channel.find` looks an uncertain send up by its tag (our
  delivery id) before a letter is sent again; :meth:`Channel.poll` asks about a letter whose
  report is late; :meth:`Channel.read_webhook` authenticates and reads a provider's callback.

:class:`BaseChannel` gives the defaults of a channel that learns nothing later.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

from dispatcher.config.models import Section, Target
from dispatcher.errors import DeliveryError, NotFound
from dispatcher.settings import Settings


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


class Status(StrEnum):
    ACCEPTED = "accepted"  # taken by the relay or gateway; a later report may still come
    PENDING = "pending"  # progress (queued, dialling): nothing to record
    DELIVERED = "delivered"  # confirmed by the far end
    FAILED = "failed"


@dataclass(frozen=True)
class Report:
    """What a channel says about one letter: at send, from a lookup by tag, or later."""

    status: Status
    #: the provider's id for this try's letter (a new try has a new one)
    remote_id: str | None
    #: our delivery id, as the letter carried it (Message-ID, client_state, label)
    tag: str | None = None
    code: int | str | None = None
    text: str = ""
    #: with FAILED: the failure as a delivery class
    error: DeliveryError | None = None
    #: the provider that carried it, shown to operators (a fax gateway's name)
    provider: str | None = None
    pages: int | None = None
    line_seconds: float | None = None

    @property
    def final(self) -> bool:
        return self.status in (Status.DELIVERED, Status.FAILED)


@dataclass(frozen=True)
class Outgoing:
    """One rendered letter handed to a channel."""

    #: our delivery id: the key a send carries so it can be found again
    tag: str
    #: the letter's stable Message-ID (the same on every try)
    message_id: str
    recipient: str
    section: Section
    target: Target
    #: who signs: "Jane Doe" (empty for a digest, which the section signs)
    sender_name: str
    #: where replies go: the supporter's address, or the section's for a digest
    reply_to: str
    #: what the renderer made for this channel's ``document`` kind
    document: Any
    date: datetime
    attempt: int
    #: the worker's send window: entered just before the step that cannot be taken back (SMTP
    #: DATA), so at most one letter per process is between that step and its recorded outcome
    window: Any = None


@dataclass(frozen=True)
class Provider:
    """The account a section's letters go through, and the provider's limits on it."""

    key: str
    rates: tuple[str, ...]


@dataclass(frozen=True)
class Secret:
    """An environment variable a section's config names for a channel."""

    #: the config key that names it ("smtp.password_env")
    key: str
    env: str
    #: what it holds, for the error when it is unset
    what: str


@dataclass(frozen=True)
class Missing:
    """A setting a section lacks for a channel."""

    #: the config key to add ("smtp", "fax.from_number")
    key: str
    #: what is missing and why, for the admin
    message: str


@dataclass(frozen=True)
class WebhookRequest:
    raw: bytes
    headers: Mapping[str, str]
    query: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Bounce:
    """A message that came back about a letter (an email bounce, an auto-reply), as its channel
    read it: the facts only, nothing of the message itself."""

    #: "hard", "soft", "delayed" (a warning: the far side still tries), "auto_reply" (someone's
    #: robot answered: the address exists), "not_a_bounce", "unreadable"
    kind: str
    #: our delivery id, read from the bounce address's token; None when none could be read
    tag: str | None = None
    #: why there is no tag ("forged", "malformed", "not_ours", "no_token"), for the counters
    untagged: str | None = None
    status: str | None = None
    diagnostic: str | None = None
    reporting_mta: str | None = None
    #: the official's address that failed, as the bounce names it
    recipient: str | None = None
    reported_at: datetime | None = None
    #: the failure is about the address itself (no such user), not this letter
    suppress: bool = False
    #: why the message could not be read, for the log
    reason: str | None = None


#: finds the section of a delivery a report names (None: no such delivery)
SectionOf = Callable[[str], Awaitable[Section | None]]


class NoWebhooks(NotFound):
    code = "no_webhook"


@runtime_checkable
class Channel(Protocol):
    name: ClassVar[str]
    document: ClassVar[str]
    address_noun: ClassVar[str]
    sent_final_after: ClassVar[timedelta | None]
    one_at_a_time: ClassVar[bool]
    #: the model of the section's ``[channels.<name>]`` table (None: the channel takes none)
    config_model: ClassVar[type[BaseModel] | None]
    #: letters of this channel can come back (email bounces): :meth:`read_bounce` reads them
    reads_bounces: ClassVar[bool]
    #: after this long in `sent` without a final report, ask (None: never); may differ per instance
    poll_after: timedelta | None
    #: a send taking longer is abandoned and retried
    send_timeout: float
    #: the worker calls :meth:`deliver_blocking` in its own thread, not :meth:`deliver` on its
    #: event loop: for a channel whose sends are blocking calls cheaper than the loop's hand-offs
    blocking: ClassVar[bool]

    @staticmethod
    def address_of(target: Target) -> str | None: ...

    @staticmethod
    def secrets(section: Section, *, live: bool) -> list[Secret]: ...

    @staticmethod
    def missing_settings(section: Section, *, live: bool) -> Missing | None: ...

    @staticmethod
    def default_limits(settings: Settings) -> tuple[str, ...]: ...

    @staticmethod
    def holds_to_office_hours(target: Target) -> bool: ...

    def provider(self, section: Section) -> Provider | None: ...

    def prepare(self, letter: Outgoing) -> Outgoing: ...

    async def deliver(self, letter: Outgoing) -> Report: ...

    def deliver_blocking(self, letter: Outgoing, *, timeout: float) -> Report: ...

    async def find(self, tag: str, section: Section) -> Report | None: ...

    async def poll(self, tag: str, remote_id: str, section: Section) -> Report | None: ...

    async def read_webhook(self, provider: str, request: WebhookRequest, section_of: SectionOf) -> Report: ...

    def read_bounce(
        self, raw: bytes, *, envelope_recipients: Sequence[str], truncated: bool, sections: Iterable[Section]
    ) -> Bounce | None: ...

    async def aclose(self) -> None: ...


class BaseChannel:
    """Defaults for a channel that learns nothing after a send: ``sent`` is final at once, no
    lookups, no webhooks, no caps of its own, office hours do not hold it."""

    name: ClassVar[str]
    document: ClassVar[str]
    address_noun: ClassVar[str] = "address"
    sent_final_after: ClassVar[timedelta | None] = timedelta(0)
    one_at_a_time: ClassVar[bool] = False
    config_model: ClassVar[type[BaseModel] | None] = None
    reads_bounces: ClassVar[bool] = False
    blocking: ClassVar[bool] = False
    poll_after: timedelta | None = None

    def __init__(self, settings: Settings):
        self.settings = settings
        self.send_timeout = 120.0

    @staticmethod
    def secrets(section: Section, *, live: bool) -> list[Secret]:
        return []

    @staticmethod
    def missing_settings(section: Section, *, live: bool) -> Missing | None:
        """What ``section`` lacks for this channel to carry its letters (None: nothing), in
        either mode or in live mode only. Config validation asks with ``live=False`` and reports
        it at every route of the section through the channel; ``dispatcher preflight`` asks
        with ``live=True``."""
        return None

    @classmethod
    def section_config(cls, section: Section) -> BaseModel | None:
        """The section's ``[channels.<name>]`` table, as the channel's model (validated at load)."""
        if cls.config_model is None:
            return None
        return cls.config_model.model_validate(section.channels.get(cls.name, {}))

    @staticmethod
    def default_limits(settings: Settings) -> tuple[str, ...]:
        return ()

    @staticmethod
    def holds_to_office_hours(target: Target) -> bool:
        return False

    def provider(self, section: Section) -> Provider | None:
        return None

    def prepare(self, letter: Outgoing) -> Outgoing:
        """Runs in the worker's own thread before :meth:`deliver`: the CPU work of turning the
        rendered document into what is sent (a MIME message, a fax job), kept off the event loop
        that every worker thread of the process shares. May raise a DeliveryError. Default: the
        letter as it is."""
        return letter

    def deliver_blocking(self, letter: Outgoing, *, timeout: float) -> Report:
        """:meth:`deliver`, in the calling thread, given up after ``timeout`` seconds
        (TimeoutError); only for a channel that says ``blocking``."""
        raise NotImplementedError(f"the {self.name} channel delivers on the event loop")

    async def find(self, tag: str, section: Section) -> Report | None:
        return None

    async def poll(self, tag: str, remote_id: str, section: Section) -> Report | None:
        return None

    async def read_webhook(self, provider: str, request: WebhookRequest, section_of: SectionOf) -> Report:
        raise NoWebhooks(f"the {self.name} channel takes no webhooks")

    def read_bounce(
        self, raw: bytes, *, envelope_recipients: Sequence[str], truncated: bool, sections: Iterable[Section]
    ) -> Bounce | None:
        """What a message that came back to one of ``sections``' bounce addresses says; None for
        a channel that has no bounces. ``truncated``: ``raw`` is only the head of a longer
        message. Never raises on bad input: an unreadable message is a Bounce of that kind."""
        return None

    async def aclose(self) -> None:
        return None
