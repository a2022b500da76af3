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

import asyncio
import hashlib
import hmac
import ipaddress
import math
import weakref
from dataclasses import dataclass, field
from functools import lru_cache

import redis
import redis.asyncio

from dispatcher.config.models import Section
from dispatcher.errors import QuotaExceeded
from dispatcher.logging import get_logger
from dispatcher.policy.limits import AsyncRateLimiter, Rate, RateLimiter
from dispatcher.settings import Settings

log = get_logger("dispatcher.intake")

#: charge_async's Redis connections per API process (its requests in flight at once) and the
#: broker's timeouts (queue/broker.py)
_ASYNC_CONNECTIONS = 64
_ASYNC_CONNECT_TIMEOUT = 2
_ASYNC_SOCKET_TIMEOUT = 10

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


@dataclass(frozen=True)
class _Plan:
    """What charging one appeal takes: the quotas that apply, their keys, the appeal's token."""

    applying: list[tuple[QuotaRates, str]]
    token: str

    @property
    def caps(self) -> list[tuple[str, tuple[Rate, ...]]]:
        return [(key, _parsed(quota.rates)) for quota, key in self.applying]


class Quotas:
    def __init__(self, limiter: RateLimiter | None, settings: Settings, pepper: bytes):
        """``limiter`` None: no quotas (a service without Redis, e.g. a benchmark's intake)."""
        self.limiter = limiter
        self.settings = settings
        self._pepper = pepper
        #: charge_async's limiters, one per event loop (redis.asyncio's connections belong to one)
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncRateLimiter] = (
            weakref.WeakKeyDictionary()
        )

    def _hashed(self, kind: str, value: str) -> str:
        return hmac.new(self._pepper, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:32]

    def charge(self, section: Section, *, campaign: str, supporter_ref: str, client_ip: str | None) -> Charge:
        """Take one slot under each of the section's quotas for this appeal, or raise
        QuotaExceeded (taking none). ``supporter_ref`` is the supporter's keyed hash."""
        plan = self._plan(section, campaign, supporter_ref, client_ip)
        if plan is None or self.limiter is None:
            return Charge()
        try:
            # every quota in one atomic call: all slots taken, or none
            held, full = self.limiter.reserve_once(plan.caps, token=plan.token)
        except redis.RedisError as exc:
            return self._unchecked(section, exc)
        return self._charged(section, plan, held, full, supporter_ref)

    async def charge_async(
        self, section: Section, *, campaign: str, supporter_ref: str, client_ip: str | None
    ) -> Charge:
        """:meth:`charge` for the API's event loop: the Redis call is awaited (redis.asyncio)."""
        plan = self._plan(section, campaign, supporter_ref, client_ip)
        if plan is None or self.limiter is None:
            return Charge()
        try:
            held, full = await self._async_limiter(self.limiter.namespace).reserve_once(plan.caps, token=plan.token)
        except redis.RedisError as exc:
            return self._unchecked(section, exc)
        return self._charged(section, plan, held, full, supporter_ref)

    async def aclose(self) -> None:
        """Close charge_async's connections on the running loop (the API's shutdown)."""
        limiter = self._async.pop(asyncio.get_running_loop(), None)
        if limiter is not None:
            await limiter.aclose()

    def _async_limiter(self, namespace: str) -> AsyncRateLimiter:
        loop = asyncio.get_running_loop()
        limiter = self._async.get(loop)
        if limiter is None:
            # The broker's timeouts (queue/broker.py); a pool that waits for a free connection
            # rather than failing, which would let an appeal through unchecked under load.
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.settings.redis_url,
                max_connections=_ASYNC_CONNECTIONS,
                timeout=_ASYNC_SOCKET_TIMEOUT,
                socket_connect_timeout=_ASYNC_CONNECT_TIMEOUT,
                socket_timeout=_ASYNC_SOCKET_TIMEOUT,
            )
            limiter = self._async[loop] = AsyncRateLimiter(redis.asyncio.Redis(connection_pool=pool), namespace)
        return limiter

    def _plan(self, section: Section, campaign: str, supporter_ref: str, client_ip: str | None) -> _Plan | None:
        if self.limiter is None:
            return None
        keys: dict[str, str] = {
            "supporter": f"quota:supporter:{supporter_ref}",
            "section": f"quota:section:{section.code}",
        }
        if client_ip is not None:
            keys["client_ip"] = f"quota:ip:{self._hashed('ip', client_network(client_ip))}"
        applying = [(q, keys[q.name]) for q in quotas_of(section, self.settings) if q.rates and q.name in keys]
        if not applying:
            return None
        return _Plan(applying, self._hashed("appeal", f"{section.code}:{campaign}:{supporter_ref}"))

    def _charged(
        self,
        section: Section,
        plan: _Plan,
        held: bool,
        full: tuple[int, float] | None,
        supporter_ref: str,
    ) -> Charge:
        if held:
            return Charge()  # this very appeal was charged already: a retry, a double submit
        if full is not None:
            which, wait = full
            self._refuse(section, plan.applying[which][0], wait, supporter_ref)
        return Charge(self.limiter, plan.token, [key for _, key in plan.applying])

    def _unchecked(self, section: Section, exc: redis.RedisError) -> Charge:
        # (nothing to give back: a slot is ours only once the reservation answered)
        log.warning("intake.quota_unchecked", section=section.code, error=type(exc).__name__)
        return Charge()

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
