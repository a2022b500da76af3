"""The validated shape of config/: campaigns, their targets, and the sections that write to them.

Models are frozen: a loaded catalog is shared by API threads and worker threads.
Fax numbers are normalised to E.164 during validation; the region used to read national
formats (Swiss "031 ..." numbers) comes from the validation context (the section's country for a
section file, the target's own country for a campaign file).
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from pydantic import (
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dispatcher.policy.hours import OfficeHours
from dispatcher.rates import Rate

#: a channel's name, as the channel registry knows it (dispatcher.channels.registry); the loader
#: checks every name a config file uses against the registry it is given
ChannelName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,15}$")]

Slug = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
LanguageCode = Annotated[str, Field(pattern=r"^[a-z]{2,3}$")]
CountryCode = Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
EnvVarName = Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {value!r} (use an IANA name such as 'Europe/Zurich')") from exc
    return value


def normalise_fax(raw: str, region: str | None) -> str:
    """Return ``raw`` as E.164, reading national formats with ``region`` (ISO 3166 alpha-2)."""
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"fax number {raw!r} cannot be read: {exc}") from exc
    if not phonenumbers.is_valid_number(number):
        where = f" (read as a {region} number)" if region and not raw.strip().startswith("+") else ""
        raise ValueError(f"fax number {raw!r} is not a valid number{where}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _valid_rates(value: list[str]) -> list[str]:
    for text in value:
        Rate.parse(text)
    return value


class Target(_Frozen):
    """An official who receives letters: a head of state, a minister, an embassy."""

    id: Slug
    name: str = Field(min_length=1)
    title: str | None = None
    organisation: str | None = None
    address: list[str] = Field(default_factory=list)
    country: CountryCode
    #: per letter language; the letter falls back to the campaign default language's salutation
    salutation: dict[LanguageCode, str] = Field(min_length=1)
    #: languages the target prefers to be addressed in, most preferred first
    languages: list[LanguageCode] = Field(min_length=1)
    timezone: str
    email: EmailStr | None = None
    fax: str | None = None
    #: how the target is reached by channels that are not built in, by channel name
    #: (e.g. ``addresses = { post = "..." }`` for a print-and-mail channel)
    addresses: dict[ChannelName, str] = Field(default_factory=dict)
    phone: str | None = None
    twitter: list[str] = Field(default_factory=list)
    #: caps on letters to this recipient per channel, across all campaigns and sections,
    #: e.g. {"fax": ["2/hour", "10/day"]}; channels not named use the service defaults
    limits: dict[ChannelName, list[str]] = Field(default_factory=dict)
    #: when faxes may arrive, in the target's time zone (docs/policy.md); default Mon–Fri 09–17
    office_hours: dict[str, Any] | None = None
    #: hold emails to office hours too (faxes always are)
    email_in_office_hours: bool = False

    _tz = field_validator("timezone")(classmethod(lambda cls, v: _check_timezone(v)))

    @field_validator("limits")
    @classmethod
    def _rates(cls, value: dict[ChannelName, list[str]]) -> dict[ChannelName, list[str]]:
        for rates in value.values():
            _valid_rates(rates)
        return value

    @model_validator(mode="after")
    def _hours(self) -> Target:
        if self.office_hours is not None:
            OfficeHours.parse(self.timezone, self.office_hours)
        return self

    @field_validator("fax")
    @classmethod
    def _fax_e164(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        region = (info.context or {}).get("region") or info.data.get("country")
        return normalise_fax(value, region)


class Campaign(_Frozen):
    """An Urgent Action: a case, its targets, its model letter languages and deadline."""

    id: Slug
    title: str
    ai_index: str
    issued: date
    #: last day to act, inclusive, in the section's timezone; a section may set its own
    deadline: date
    status: Literal["open", "closed"] = "open"
    closed_reason: str | None = None
    #: languages the case asks supporters to write in (the UA's "preferred languages")
    preferred_languages: list[LanguageCode] = Field(min_length=1)
    #: languages the model letter exists in (templates/<template_set>/<lang>/)
    letter_languages: list[LanguageCode] = Field(min_length=1)
    default_language: LanguageCode
    #: a campaign whose targets are real offices used as example data: never sent live
    sandbox_only: bool = False
    #: which templates/ folder holds the letters; defaults to the campaign id
    template_set: Slug | None = None
    targets: dict[str, Target] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Campaign:
        if self.default_language not in self.letter_languages:
            raise ValueError(
                f"default_language {self.default_language!r} is not one of letter_languages {self.letter_languages}"
            )
        if self.deadline < self.issued:
            raise ValueError(f"deadline {self.deadline} is before issued {self.issued}")
        for key, target in self.targets.items():
            if key != target.id:
                raise ValueError(f"targets.{key}: id {target.id!r} differs from its key")
        return self

    @property
    def templates(self) -> str:
        return self.template_set or self.id


class Route(_Frozen):
    """One target a section writes to, and through which channels."""

    target: Slug
    channels: list[ChannelName] = Field(min_length=1)
    #: when this target's line cannot carry every letter before the deadline, send one digest
    #: (the model letter and the list of supporters) instead of the letters that would not make
    #: it (docs/digests.md). Off by default: individual letters carry more weight.
    digest: bool = False
    #: channels that carry the letter instead, in this order, when the route's own channel
    #: refuses the target's address for good (an email address that bounced or is known to
    #: bounce): ``fallback = ["fax"]``. One letter per target still: the first fallback the
    #: target can receive replaces the refused letter (docs/email.md, "Fallback").
    fallback: list[ChannelName] = Field(default_factory=list)

    @field_validator("channels", "fallback")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a channel is listed twice")
        return value


class Participation(_Frozen):
    """How one section takes part in one campaign."""

    #: the section's own published deadline, when it differs from the campaign's
    deadline: date | None = None
    writes: list[Route] = Field(default_factory=list)
    #: section-local targets (``[targets]`` of the section file), e.g. the embassy in its country
    copies_to: list[Route] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something_to_send(self) -> Participation:
        if not self.writes and not self.copies_to:
            raise ValueError("writes and copies_to are both empty: appeals would send nothing")
        return self


class Sender(_Frozen):
    """Who the letters come from: 'Jane Doe via Amnesty USA' <appeals@...>."""

    name: str = Field(min_length=1)
    address: EmailStr
    #: envelope sender (bounces); must be on the section's own domain
    envelope: EmailStr | None = None
    #: shown on fax cover pages as the reply contact
    reply_contact: str | None = None

    @model_validator(mode="after")
    def _same_domain(self) -> Sender:
        if self.envelope is not None:
            ours = self.address.rsplit("@", 1)[1].lower()
            theirs = self.envelope.rsplit("@", 1)[1].lower()
            if ours != theirs and not theirs.endswith("." + ours):
                raise ValueError(f"envelope {self.envelope!r} is not on the sender's domain {ours!r}")
        return self

    @property
    def envelope_sender(self) -> str:
        return str(self.envelope or self.address)

    @property
    def domain(self) -> str:
        return str(self.address).rsplit("@", 1)[1]


class SmtpRelay(_Frozen):
    host: str = Field(min_length=1)
    port: int = Field(587, ge=1, le=65535)
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    #: a PEM file of CAs trusted in addition to the system's (a relay with a private CA);
    #: relative to config/ unless absolute
    ca_file: str | None = Field(None, min_length=1)
    #: the name we give in EHLO in live mode; default: the sender's domain (relays that want a
    #: fully qualified name refuse "localhost")
    ehlo_name: str | None = Field(None, pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$")
    username_env: EnvVarName | None = None
    password_env: EnvVarName | None = None
    #: connections kept open to this relay per worker process
    pool_size: int = Field(4, ge=1, le=64)
    #: a connection is closed and replaced after this many messages
    max_messages_per_connection: int = Field(100, ge=1)
    #: seconds an unused connection stays open
    idle_timeout: float = Field(30.0, gt=0)
    #: seconds for connect and for each SMTP command
    timeout: float = Field(30.0, gt=0)
    #: the provider's limits on this relay, e.g. ["10/second", "10000/day"] (a tuple: relay
    #: configs are hashed, one SMTP pool per relay)
    rate: tuple[str, ...] = ()

    @field_validator("rate")
    @classmethod
    def _relay_rates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_valid_rates(list(value)))

    @model_validator(mode="after")
    def _credentials_pair(self) -> SmtpRelay:
        if (self.username_env is None) != (self.password_env is None):
            raise ValueError("username_env and password_env go together")
        return self


#: a DKIM selector: one or more DNS labels (the name before ``._domainkey.``)
DkimSelector = Annotated[str, Field(pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*$")]
_HOSTNAME = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")


def ascii_domain(domain: str) -> str:
    """A domain as it goes into headers and DNS: lower case, IDNA for a non-ASCII one."""
    domain = domain.lower().rstrip(".")
    return domain if domain.isascii() else domain.encode("idna").decode("ascii")


class DkimConfig(_Frozen):
    """A section's DKIM keys: every letter carries an Ed25519 and an RSA signature (RFC 8463:
    receivers that cannot verify Ed25519 yet ignore that one and verify the RSA one).

    Key material never goes in the TOML: each key is read from a PEM file (relative to the
    config directory unless absolute) or from an environment variable holding the PEM text.
    """

    #: the signing domain (d=): the sender's domain or a parent of it, so DMARC aligns;
    #: defaults to the sender's domain
    domain: str | None = None
    rsa_selector: DkimSelector
    ed25519_selector: DkimSelector
    rsa_key_file: str | None = None
    rsa_key_env: EnvVarName | None = None
    ed25519_key_file: str | None = None
    ed25519_key_env: EnvVarName | None = None

    @field_validator("domain")
    @classmethod
    def _hostname(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            name = ascii_domain(value)
        except UnicodeError:
            name = ""
        if not _HOSTNAME.match(name):
            raise ValueError(f"{value!r} is not a domain name")
        return name

    @field_validator("rsa_key_file", "ed25519_key_file")
    @classmethod
    def _a_path(cls, value: str | None) -> str | None:
        # Never echo the value: an admin may have pasted the key itself.
        if value is not None and ("-----BEGIN" in value or "\n" in value or not value.strip()):
            raise ValueError("must be the PATH of a PEM file, never the key itself")
        return value

    @model_validator(mode="after")
    def _one_source_per_key(self) -> DkimConfig:
        for algorithm in ("rsa", "ed25519"):
            file, env = getattr(self, f"{algorithm}_key_file"), getattr(self, f"{algorithm}_key_env")
            if file is not None and env is not None:
                raise ValueError(f"{algorithm}_key_file and {algorithm}_key_env are both set; set exactly one")
            if file is None and env is None:
                raise ValueError(
                    f"{algorithm}_key_file or {algorithm}_key_env is needed: the {algorithm} private key's PEM "
                    "file, or the environment variable holding its PEM text"
                )
        if self.rsa_selector.lower() == self.ed25519_selector.lower():
            raise ValueError("ed25519_selector is the same as rsa_selector; each key needs its own DNS record")
        return self


class FaxConfig(_Frozen):
    """A section's fax gateway for live mode (sandbox mode always uses the local fax lab)."""

    gateway: Literal["telnyx", "sinch"]
    #: caller id, E.164 after normalisation with the section's country
    from_number: str | None = None
    #: the header line some machines print ("TSI"): ASCII, at most 20 characters. Sinch only:
    #: Telnyx's API has no field for it (``from_display_name`` is the SIP caller name, not the TSI)
    station_id: str | None = Field(None, max_length=20, pattern=r"^[ -~]*$")
    #: override of the gateway's API address (a regional endpoint)
    base_url: str | None = None
    # Telnyx
    api_key_env: EnvVarName | None = None
    connection_id: str | None = None
    # Sinch
    project_id: str | None = None
    key_id_env: EnvVarName | None = None
    key_secret_env: EnvVarName | None = None
    #: the gateway account's limits, e.g. ["1/second"]
    rate: tuple[str, ...] = ()

    @field_validator("rate")
    @classmethod
    def _gateway_rates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_valid_rates(list(value)))

    @field_validator("from_number")
    @classmethod
    def _from_e164(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else normalise_fax(value, (info.context or {}).get("region"))

    @model_validator(mode="after")
    def _gateway_settings(self) -> FaxConfig:
        needed = {"telnyx": ("api_key_env", "connection_id"), "sinch": ("project_id", "key_id_env", "key_secret_env")}
        missing = [key for key in needed[self.gateway] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"gateway {self.gateway!r} needs {', '.join(missing)}")
        if self.gateway == "telnyx" and self.station_id is not None:
            # Refused rather than accepted and silently never sent.
            raise ValueError(
                "station_id cannot be used with telnyx: its fax API has no field for the header line "
                "(machines print the from_number instead); remove station_id"
            )
        return self

    def secret_envs(self) -> list[tuple[str, str]]:
        """(key, environment variable) for each secret this gateway reads."""
        keys = ("api_key_env",) if self.gateway == "telnyx" else ("key_id_env", "key_secret_env")
        return [(key, getattr(self, key)) for key in keys]


_BOUNCE_DOMAIN = r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"


class BounceMailbox(_Frozen):
    """An IMAP mailbox the section's bounces land in, polled by ``dispatcher bounces``."""

    host: str = Field(min_length=1)
    port: int = Field(993, ge=1, le=65535)
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    username_env: EnvVarName
    password_env: EnvVarName
    folder: str = Field("INBOX", min_length=1)
    #: a PEM of CAs trusted beside the system's (a private CA); relative to config/
    ca_file: str | None = None
    #: seconds between polls
    interval: float = Field(60.0, ge=5.0, le=3600.0)


class Bounces(_Frozen):
    """Where the section's bounces come back: every letter's envelope sender is
    ``<local_part>+<token>@<domain>`` (VERP), the token naming the letter under a MAC."""

    #: the bounce domain, the sender's domain or a subdomain of it (SPF then aligns with the From
    #: domain under DMARC's relaxed alignment); its MX points at ``dispatcher bounces``
    domain: str = Field(max_length=253, pattern=_BOUNCE_DOMAIN)
    local_part: str = Field("bounces", pattern=r"^[a-z0-9][a-z0-9._-]{0,15}$")
    imap: BounceMailbox | None = None


class IntakeConfig(_Frozen):
    """How the section's web form may post (``[intake]``). Each quota is a list of rates such as
    ``["600/minute", "20000/day"]``; left out, the service's default applies (the
    ``DISPATCH_*_QUOTA`` settings); ``[]`` switches that quota off for this section."""

    #: appeals accepted through this section's key
    quota: tuple[str, ...] | None = None
    #: appeals by one supporter (email address), counted across every section, when they post
    #: through this one
    supporter_quota: tuple[str, ...] | None = None
    #: appeals from one client IP address, when the form passes ``client_ip``
    client_ip_quota: tuple[str, ...] | None = None

    @field_validator("quota", "supporter_quota", "client_ip_quota")
    @classmethod
    def _quota_rates(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(_valid_rates(list(value)))


#: the origin that means "any page" in ``counter_origins``
ANY_ORIGIN = "*"


def normalise_origin(raw: str) -> str:
    """``raw`` as browsers send it in ``Origin``: ``scheme://host[:port]``, lower case, the
    host in ASCII (IDNA), no default port, no path. Anything else is refused: an origin that
    can never match a browser's would fail silently, page by page."""
    parts = urlsplit(raw.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"origin {raw!r} is not scheme://host[:port] with scheme http or https")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"origin {raw!r} holds a user name; an origin is scheme://host[:port] only")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"origin {raw!r} has a path, query or fragment; an origin is scheme://host[:port] only")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"origin {raw!r} has an invalid port") from exc
    scheme = parts.scheme.lower()
    host = ascii_domain(parts.hostname) if ":" not in parts.hostname else f"[{parts.hostname.lower()}]"
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


class Web(_Frozen):
    """Which web pages may read the public read endpoints from a browser (CORS). Nothing is
    needed to embed the badge with ``<img>``; this is for a page's own ``fetch()``."""

    #: pages that may read this section's appeals (``GET /v1/appeals/{id}``) and the counters of
    #: its campaigns; never ``*``: an appeal's letters are for the section's own pages
    origins: list[str] = Field(default_factory=list)
    #: pages that may read the counters of the section's campaigns; ``["*"]``: any page.
    #: Default: ``origins``
    counter_origins: list[str] | None = None

    @field_validator("origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        if ANY_ORIGIN in value:
            raise ValueError(
                "'*' is allowed only in counter_origins: an appeal's letters are for the section's own pages"
            )
        return _unique_origins(value)

    @field_validator("counter_origins")
    @classmethod
    def _counter_origins(cls, value: list[str] | None) -> list[str] | None:
        if value is None or value == [ANY_ORIGIN]:
            return value
        if ANY_ORIGIN in value:
            raise ValueError("'*' already allows every page: write counter_origins = [\"*\"] alone")
        return _unique_origins(value)

    @property
    def counters(self) -> list[str]:
        return self.origins if self.counter_origins is None else self.counter_origins


def _unique_origins(value: list[str]) -> list[str]:
    origins = [normalise_origin(raw) for raw in value]
    twice = sorted({o for o in origins if origins.count(o) > 1})
    if twice:
        raise ValueError(f"origin listed twice: {', '.join(twice)}")
    return origins


_SECTION_CODE = re.compile(r"^[a-z]{2,8}$")


class Section(_Frozen):
    """A national office: its identity, relay, intake key and the campaigns it takes part in."""

    code: str
    name: str = Field(min_length=1)
    country: CountryCode
    timezone: str
    #: languages its web form may post appeals in
    languages: list[LanguageCode] = Field(min_length=1)
    #: name of the environment variable holding the HMAC intake key (never the key itself)
    intake_key_env: EnvVarName
    sender: Sender
    #: the relay; needed only when a route of the section sends email (the loader checks)
    smtp: SmtpRelay | None = None
    #: DKIM signing of every email letter (docs/email.md); None: letters go out unsigned
    dkim: DkimConfig | None = None
    fax: FaxConfig | None = None
    #: per-letter bounce addresses and where bounces are read (docs/email.md, "Bounces")
    bounces: Bounces | None = None
    #: the web form's quotas (``[intake]``)
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    #: the section's settings of channels that are not built in, by channel name
    #: (``[channels.post]``); each channel validates its own table (``Channel.config_model``).
    #: Email and fax keep their historic tables, ``[smtp]`` and ``[fax]``.
    channels: dict[ChannelName, dict[str, Any]] = Field(default_factory=dict)
    #: the pages that may read the public endpoints from a browser (docs/config.md, "[web]")
    web: Web = Field(default_factory=Web)
    targets: dict[str, Target] = Field(default_factory=dict)
    campaigns: dict[str, Participation] = Field(default_factory=dict)

    _tz = field_validator("timezone")(classmethod(lambda cls, v: _check_timezone(v)))

    @model_validator(mode="after")
    def _bounce_domain(self) -> Section:
        if self.bounces is not None:
            ours = self.sender.domain.lower()
            theirs = self.bounces.domain.lower()
            if theirs != ours and not theirs.endswith("." + ours):
                raise ValueError(
                    f"bounces.domain {self.bounces.domain!r} is not the sender's domain {ours!r} nor a "
                    "subdomain of it (DMARC alignment)"
                )
        return self

    @field_validator("dkim")
    @classmethod
    def _aligned(cls, value: DkimConfig | None, info: ValidationInfo) -> DkimConfig | None:
        sender = info.data.get("sender")
        if value is None or not isinstance(sender, Sender):
            return value  # an invalid [sender] is reported on its own
        ours = ascii_domain(sender.domain)
        if value.domain is None:
            return value.model_copy(update={"domain": ours})
        if ours != value.domain and not ours.endswith("." + value.domain):
            raise ValueError(
                f"domain {value.domain!r} is neither the sender's domain {ours!r} nor a parent of it, "
                "so DMARC would not align; leave domain out to sign as the sender's domain"
            )
        return value

    @field_validator("code")
    @classmethod
    def _code(cls, value: str) -> str:
        if not _SECTION_CODE.match(value):
            raise ValueError("a section code is 2 to 8 lower-case letters, e.g. 'ch' or 'us'")
        return value
