"""Intake quotas: how many appeals one section key, one supporter and one client IP may post.

They are what stops a leaked form key or a bot behind a form from filling the ledger (and the
officials' inboxes after it). Each quota is a list of rates ("600/minute", "20000/day") counted
in Redis by the caps' own limiter (:mod:`dispatcher.policy.limits`), so a quota holds across every
API process. A quota counts *appeals written*, not requests:

* every appeal takes its slot under a token naming the appeal's identity (section, campaign,
  supporter): a retry with the same ``client_ref``, a double submit or a duplicate finds its
  slot already taken and is not charged again, nor refused for a quota it already passed;
* a request refused after its slot was taken (a 409, a replay) gives the slot back.

The supporter and the client IP are keyed by a keyed hash (the pepper), never in clear.

When Redis does not answer the quotas are not checked and the appeal is accepted (a warning
``intake.quota_unchecked`` is logged): intake keeps working without Redis (the ledger is the
outbox), and refusing supporters because our own infrastructure is away would lose appeals
that nobody sends again, while the caps at sending still protect the officials.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
from dataclasses import dataclass, field
from functools import lru_cache

import redis

from dispatcher.config.models import Section
from dispatcher.errors import QuotaExceeded
from dispatcher.logging import get_logger
from dispatcher.policy.limits import Rate, RateLimiter
from dispatcher.settings import Settings

log = get_logger("dispatcher.intake")

#: the quotas, in the order they are checked and shown
NAMES = ("section", "supporter", "client_ip")


@dataclass(frozen=True)
class QuotaRates:
    """One quota as it applies to a section: its rates and whether they are the service default."""

    name: str
    rates: tuple[str, ...]
    default: bool

    def describe(self) -> str:
        shown = ", ".join(self.rates) or "none"
        return f"{shown} (default)" if self.default else shown


def quotas_of(section: Section, settings: Settings) -> list[QuotaRates]:
    """The section's quotas: its ``[intake]`` table's where set, else the service's defaults."""
    own = {
        "section": section.intake.quota,
        "supporter": section.intake.supporter_quota,
        "client_ip": section.intake.client_ip_quota,
    }
    defaults = {
        "section": settings.section_quota,
        "supporter": settings.supporter_quota,
        "client_ip": settings.client_ip_quota,
    }
    out = []
    for name in NAMES:
        rates = own[name]
        out.append(QuotaRates(name, defaults[name] if rates is None else rates, rates is None))
    return out


@lru_cache(maxsize=64)
def _parsed(texts: tuple[str, ...]) -> tuple[Rate, ...]:
    # Parsed once per distinct setting, not once per appeal.
    return tuple(Rate.parse(text) for text in texts)


def client_network(text: str) -> str:
    """The address a client-IP quota counts: an IPv4 address, an IPv6 host's /64 (one host
    commonly holds a whole /64, so counting single IPv6 addresses would count nothing)."""
    address = ipaddress.ip_address(text.strip())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


@dataclass
class Charge:
    """The slots one appeal took; :meth:`cancel` gives them back when the appeal is not written."""

    limiter: RateLimiter | None = None
    token: str = ""
    keys: list[str] = field(default_factory=list)

    def cancel(self) -> None:
        if self.limiter is None:
            return
        try:
            for key in self.keys:
                self.limiter.cancel(key, self.token)
        except redis.RedisError:
            pass  # the slots expire with their window
        self.keys = []


class Quotas:
    def __init__(self, limiter: RateLimiter | None, settings: Settings, pepper: bytes):
        """``limiter`` None: no quotas (a service without Redis, e.g. a benchmark's intake)."""
        self.limiter = limiter
        self.settings = settings
        self._pepper = pepper

    def _hashed(self, kind: str, value: str) -> str:
        return hmac.new(self._pepper, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:32]

    def counted(self, section: Section) -> bool:
        """Whether an appeal through ``section`` is counted in Redis (a call that may wait on
        the network: the API makes it off its event loop)."""
        return self.limiter is not None and any(q.rates for q in quotas_of(section, self.settings))

    def charge(self, section: Section, *, campaign: str, supporter_ref: str, client_ip: str | None) -> Charge:
        """Take one slot under each of the section's quotas for this appeal, or raise
        QuotaExceeded (taking none). ``supporter_ref`` is the supporter's keyed hash."""
        if self.limiter is None:
            return Charge()
        keys: dict[str, str] = {
            "supporter": f"quota:supporter:{supporter_ref}",
            "section": f"quota:section:{section.code}",
        }
        if client_ip is not None:
            keys["client_ip"] = f"quota:ip:{self._hashed('ip', client_network(client_ip))}"
        applying = [(q, keys[q.name]) for q in quotas_of(section, self.settings) if q.rates and q.name in keys]
        if not applying:
            return Charge()
        token = self._hashed("appeal", f"{section.code}:{campaign}:{supporter_ref}")
        charge = Charge(self.limiter, token)
        try:
            # every quota in one atomic call: all slots taken, or none
            held, full = self.limiter.reserve_once(
                [(key, _parsed(quota.rates)) for quota, key in applying], token=token
            )
            if held:
                return Charge()  # this very appeal was charged already: a retry, a double submit
            if full is not None:
                which, wait = full
                self._refuse(section, applying[which][0], wait, supporter_ref)
            charge.keys = [key for _, key in applying]
        except redis.RedisError as exc:
            charge.cancel()
            log.warning("intake.quota_unchecked", section=section.code, error=type(exc).__name__)
            return Charge()
        return charge

    def _refuse(self, section: Section, quota: QuotaRates, wait: float, supporter_ref: str) -> None:
        retry_after = max(1, math.ceil(wait))
        whose = {
            "section": f"section {section.code!r}",
            "supporter": "this supporter (across all sections)",
            "client_ip": "this client IP address",
        }[quota.name]
        log.warning(
            "intake.quota_exceeded",
            section=section.code,
            quota=quota.name,
            limits=list(quota.rates),
            retry_after=retry_after,
            supporter_ref=supporter_ref if quota.name == "supporter" else None,
        )
        raise QuotaExceeded(
            f"the quota of {whose} ({', '.join(quota.rates)}) is used up; retry in {retry_after} s",
            quota=quota.name,
            limits=quota.rates,
            retry_after=retry_after,
        )
