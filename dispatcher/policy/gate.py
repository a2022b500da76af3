"""The last check before a letter goes out: is the recipient's office open, and is there room
under its caps? Both hold across every worker (the caps live in Redis). A letter that may not go
now is *deferred* — rescheduled for when it may, not failed and not counted as a try.

The pacing planner (pacing.py) is meant to release letters so that this gate rarely says no;
the gate is what makes the caps hold even when it does not.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import redis

from dispatcher.channels.registry import Channels
from dispatcher.config.models import Target
from dispatcher.errors import DeferredError
from dispatcher.policy.hours import OfficeHours
from dispatcher.policy.limits import Rate, RateLimiter
from dispatcher.settings import Settings

#: seconds a letter waits when Redis, which holds the caps, does not answer
LIMITER_DOWN_WAIT = 15.0


@lru_cache(maxsize=256)
def parsed_rates(texts: tuple[str, ...]) -> tuple[Rate, ...]:
    # Parsed once per distinct setting, not once per letter: this runs before every send.
    return tuple(Rate.parse(text) for text in texts)


@lru_cache(maxsize=1024)
def _hours(timezone: str, spec: tuple[tuple[str, Any], ...] | None) -> OfficeHours:
    return OfficeHours.parse(timezone, dict(spec) if spec is not None else None)


def _frozen(spec: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    if spec is None:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in spec.items()))


class SendingGate:
    """Each channel says whether office hours hold its letters and what its default caps are
    (the registry); a target's own ``limits`` for a channel replace that channel's defaults."""

    def __init__(self, limiter: RateLimiter, settings: Settings, channels: Channels):
        self.limiter = limiter
        self.settings = settings
        self.channels = channels

    def hours_for(self, target: Target, channel: str) -> OfficeHours | None:
        if not self.settings.office_hours:
            return None
        if not self.channels.kind(channel).holds_to_office_hours(target):
            return None
        return _hours(target.timezone, _frozen(target.office_hours))

    def rate_texts(self, target: Target, channel: str) -> tuple[str, ...]:
        own = target.limits.get(channel)
        if own is not None:
            return tuple(own)
        defaults: tuple[str, ...] = self.channels.kind(channel).default_limits(self.settings)
        return defaults

    def admit(
        self,
        *,
        target: Target,
        channel: str,
        recipient: str,
        token: str,
        now: datetime,
        provider: str | None = None,
        provider_rates: Sequence[str] = (),
    ) -> None:
        """Return when the letter may go now (its slots are taken); raise DeferredError otherwise.

        ``provider`` names the relay or gateway account the letter goes through, with its limits.
        """
        hours = self.hours_for(target, channel)
        if hours is not None and not hours.is_open(now):
            opens = hours.next_open(now)
            raise DeferredError(
                f"outside the recipient's office hours; opens {opens.isoformat()}",
                retry_after=(opens - now).total_seconds() + self._spread(target, channel),
                reason="office_hours",
            )
        texts = self.rate_texts(target, channel)
        caps = [(f"recipient:{channel}:{recipient}", texts, "the recipient's cap", "recipient_cap")]
        if provider is not None and provider_rates:
            caps.append((provider, tuple(provider_rates), f"{provider}'s limit", "provider_limit"))
        caps = [cap for cap in caps if cap[1]]
        if not caps:
            return
        try:
            # One round trip for the recipient's cap and the relay's limit: both slots or neither.
            full = self.limiter.reserve_all([(key, parsed_rates(tuple(t))) for key, t, _, _ in caps], token=token)
        except redis.RedisError as exc:
            # Our own infrastructure is away (a Redis restart): hold the letter back, without
            # charging it a try, rather than send it past a cap nobody can check.
            raise DeferredError(
                f"the caps cannot be checked ({type(exc).__name__}); held back",
                retry_after=LIMITER_DOWN_WAIT,
                reason="limits_unavailable",
            ) from exc
        if full is not None:
            _, used_up, what, why = caps[full[0]]
            raise DeferredError(
                f"{what} is used up ({', '.join(used_up)})",
                retry_after=full[1] + self._spread(target, channel),
                reason=why,
            )

    def _spread(self, target: Target, channel: str) -> float:
        # Letters held back together would all come back at the same instant and all but one be
        # held back again: spread them over one cap interval.
        rates = parsed_rates(self.rate_texts(target, channel))
        gap = min((r.seconds / r.count for r in rates), default=1.0)
        return random.uniform(0, gap)
